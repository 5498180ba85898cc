"""Errors raised by the replication core and the frame codec."""

from __future__ import annotations


class ProtocolError(Exception):
    """A frame or message from a peer is malformed, oversized or of an unknown version.

    The codec raises only this type, so a transport can close the one
    connection that sent garbage and keep the node running.
    """


class NotPrimary(Exception):
    """The replica cannot accept a proposal or a read: it is not the primary.

    ``primary_id`` is the primary this replica currently follows, or None when
    it knows of none; a caller may forward the request there.
    """

    def __init__(self, primary_id: str | None) -> None:
        super().__init__("not the primary" if primary_id is None else f"not the primary; primary is {primary_id}")
        self.primary_id = primary_id


class ProposalRejected(Exception):
    """The primary refused a proposal it cannot take now (too large, or too much uncommitted work).

    This is overload, not a missing primary: the node is the primary and says
    so, and the driver answers "overloaded, retry later" rather than "no
    primary is known". ``reason`` says which limit was hit.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(f"proposal rejected: {reason}")
        self.reason = reason


class EntryTooLarge(ProposalRejected):
    """A proposal larger than any entry may be (``max_entry_bytes``): no retry can succeed."""

    def __init__(self, size: int, bound: int) -> None:
        super().__init__("payload larger than max_entry_bytes")
        self.size = size
        self.bound = bound
