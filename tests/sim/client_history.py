"""The client history of a simulated run, checked for linearizability (a mixin of simulator.Simulation).

The simulation records what its client saw, on one logical clock (an event
counter, so that two events of one step keep their order):

- each write (``propose`` of a fresh payload that the primary accepted): the
  event of its invocation and, once a primary applied it and so answered the
  client, of its completion. A write never answered stays open: it may have
  taken effect (committed after its primary crashed) or not;
- each confirmed read (``ask_read``, on a primary or through ReadIndex on a
  backup): its invocation, its completion (the driver hands over the
  ``ReadResult`` once the store applied ``read_index``) and its read index.

The model is the vault's: every payload is a token, a write is its tokenize
(insert-once) and a read is a detokenize of every token at once, which
observes a token present exactly when its entry is committed at an index up to
the read index (the store answering the read has applied that prefix). As
tests/integration/linearizability.py does for a batch detokenize, the history is
checked per token (Herlihy and Wing's locality), each token an insert-once
register, by that module's Wing-Gong search (``is_linearizable``).

For one register with one insert only two reads can bind, as for the epoch
there: the history is linearizable iff the insert's point can lie after the
start of every read that saw the token absent and before the end of every read
that saw it present, that is after the latest-starting "absent" read's start and
before the earliest-ending "present" read's end. So each token's history holds
its write and those (at most) two reads, and the search stays tiny. A search
that outgrows its bound is still reported ("linearizability undecided"), never
passed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

# The checker lives with the real-process tests; appended, so no module of tests/sim is shadowed.
_INTEGRATION = str(Path(__file__).resolve().parent.parent / "integration")
if _INTEGRATION not in sys.path:
    sys.path.append(_INTEGRATION)

from linearizability import Call, SearchTooLarge, is_linearizable, register_step  # noqa: E402

MAX_SEARCH_STATES = 10_000


@dataclass
class WriteRecord:
    start: int
    start_step: int
    end: int | None = None  # None: never acknowledged, its outcome unknown
    end_step: int | None = None


@dataclass(frozen=True, slots=True)
class ReadRecord:
    start: int
    end: int
    start_step: int
    end_step: int
    node_id: str
    read_index: int


class ClientHistory:
    """Needs the Simulation's step_number, committed and fail."""

    def _init_history(self) -> None:
        self.history_clock = 0
        self.history_writes: dict[bytes, WriteRecord] = {}
        self.history_reads: list[ReadRecord] = []
        self.history_read_starts: dict[tuple[str, int], tuple[int, int]] = {}
        self.history_registers_checked = 0

    def _history_tick(self) -> int:
        self.history_clock += 1
        return self.history_clock

    def record_write_invoked(self, payload: bytes) -> None:
        self.history_writes[payload] = WriteRecord(self._history_tick(), self.step_number)

    def record_write_acknowledged(self, payload: bytes) -> None:
        write = self.history_writes.get(payload)
        if write is not None and write.end is None:
            write.end, write.end_step = self._history_tick(), self.step_number

    def record_read_invoked(self, node_id: str, request_id: int) -> None:
        self.history_read_starts[(node_id, request_id)] = (self._history_tick(), self.step_number)

    def record_read_dropped(self, node_id: str, request_id: int) -> None:
        self.history_read_starts.pop((node_id, request_id), None)

    def record_read_confirmed(self, node_id: str, request_id: int, read_index: int) -> None:
        started = self.history_read_starts.pop((node_id, request_id), None)
        if started is not None:
            self.history_reads.append(ReadRecord(started[0], self._history_tick(), started[1], self.step_number,
                                                 node_id, read_index))

    def token_calls(self, every_read: bool = False) -> dict[bytes, list[Call]]:
        """Per written payload: its insert, and the two reads that can bind (see the module docstring);
        every_read: every confirmed read instead (the tests compare the two verdicts)."""
        committed_at = {payload: index for index, (_, payload) in self.committed.items()}
        histories: dict[bytes, list[Call]] = {}
        for payload, write in self.history_writes.items():
            calls = [Call(0, write.start, write.end, ("insert", payload))]
            index = committed_at.get(payload)
            latest_absent: ReadRecord | None = None
            earliest_present: ReadRecord | None = None
            for number, read in enumerate(self.history_reads):
                seen = index is not None and index <= read.read_index
                if every_read:
                    calls.append(Call(number + 1, read.start, read.end, ("read",), payload if seen else None))
                elif seen:
                    if earliest_present is None or read.end < earliest_present.end:
                        earliest_present = read
                elif latest_absent is None or read.start > latest_absent.start:
                    latest_absent = read
            if latest_absent is not None:  # (neither is set with every_read)
                calls.append(Call(1, latest_absent.start, latest_absent.end, ("read",), None))
            if earliest_present is not None:
                calls.append(Call(2, earliest_present.start, earliest_present.end, ("read",), payload))
            histories[payload] = calls
        return histories

    def linearizability_violations(self) -> list[str]:
        """Every token's register is linearizable; a message per token that is not, or is undecided."""
        violations: list[str] = []
        for payload, calls in self.token_calls().items():
            self.history_registers_checked += 1
            try:
                if is_linearizable(calls, None, register_step, max_states=MAX_SEARCH_STATES):
                    continue
            except SearchTooLarge:
                violations.append(f"linearizability undecided: the search over token {payload[:12]!r}'s "
                                  f"{len(calls)} calls outgrew {MAX_SEARCH_STATES} states")
                continue
            violations.append(f"not linearizable: token {payload[:12]!r} {self._describe(payload, calls)}")
        return violations

    def _describe(self, payload: bytes, calls: list[Call]) -> str:
        write = self.history_writes[payload]
        index = next((index for index, (_, held) in self.committed.items() if held == payload), None)
        parts = [f"written at step {write.start_step}, "
                 + (f"acknowledged at step {write.end_step}" if write.end_step is not None else "never acknowledged")
                 + (f", committed at index {index}" if index is not None else ", never committed")]
        reads = {(read.start, read.end): read for read in self.history_reads}
        for call in calls[1:]:
            read = reads[(call.start, call.end)]
            seen = "saw it" if call.output is not None else "missed it"
            parts.append(f"a read on {read.node_id} asked at step {read.start_step}, answered at step "
                         f"{read.end_step} with read index {read.read_index}, {seen}")
        return "; ".join(parts)

    def check_linearizable_history(self) -> None:
        violations = self.linearizability_violations()
        if violations:
            shown = "\n  ".join(violations[:5])
            self.fail(f"{len(violations)} token(s) of the client history fail the linearizability check:\n  {shown}")
