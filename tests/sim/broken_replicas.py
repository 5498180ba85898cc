"""Deliberately broken replicas: each breaks one safety rule, to prove the simulation notices.

They live here, in the simulation tests, and nowhere else: the node builds a
plain protocol.Replica from its configuration and cannot reach these.
"""

from __future__ import annotations

from protocol import Replica


class AcknowledgesWithoutMajority(Replica):
    """Commits (and so lets the client be answered) once any single copy is durable."""

    def _commit_quorum_size(self) -> int:
        return 1


class VotesWithoutUpToDateCheck(Replica):
    """Grants votes to candidates whose log is behind its own (no election restriction)."""

    def _candidate_is_up_to_date(self, last_index: int, last_view: int) -> bool:
        return True


class CommitsEarlierViewByCounting(Replica):
    """Commits an entry of an earlier view as soon as a majority holds it (Raft figure 8)."""

    def _may_commit_entry_of_view(self, view: int | None) -> bool:
        return view is not None


BROKEN_VARIANTS = (AcknowledgesWithoutMajority, VotesWithoutUpToDateCheck, CommitsEarlierViewByCounting)
