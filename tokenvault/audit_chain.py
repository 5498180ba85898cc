"""The audit trail's record format and hash chain, shared by the store (which chains records at
apply), the API (which pages them out) and the command line (which verifies them).

At apply every node gives a record the next sequence number and computes
``hash = SHA-256(previous hash || msgpack([seq, *fields]))`` with 32 zero
bytes before the first record. Apply is deterministic, so every node holds the
same chain; anyone can recompute it from the records the API pages out
(``ChainVerifier``), and a record changed on disk no longer matches its hash or
breaks the link to the next one. tokenvault/api/audit.py has the group commit.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Any

import msgpack

GENESIS_HASH = bytes(32)
# The fields of one record as the API pages them out, in canonical order.
RECORD_FIELDS = ("at_ms", "node", "key_name", "key_id", "action", "items", "found", "request_id", "subject")
# Every member of a record's JSON form (record_document), and no other: a member outside RECORD_FIELDS is
# not hashed, so a record that carries one is not the record the chain holds.
RECORD_MEMBERS = frozenset({"seq", *RECORD_FIELDS, "prev_hash", "hash"})
# A hash as a record (and an anchor) names it: bytes.hex(), 64 lowercase hex digits and nothing else.
HASH_TEXT = re.compile(r"[0-9a-f]{64}")
# The action of a trim's own record, whose subject is the record it trimmed through: the anchor.
TRIM_ACTION = "audit.trim"


def parse_hash(text: object) -> bytes:
    """The 32 bytes of a hash in the exact form a node writes (``HASH_TEXT``); ValueError otherwise.
    bytes.fromhex alone also takes uppercase digits and whitespace, which no node writes."""
    if not isinstance(text, str) or not HASH_TEXT.fullmatch(text):
        raise ValueError("a hash is 64 lowercase hex digits")
    return bytes.fromhex(text)


def chain_hash(previous: bytes, seq: int, fields: Sequence[Any]) -> bytes:
    """The hash of record ``seq``: SHA-256 over the previous hash and the canonical encoding."""
    canonical = msgpack.packb([seq, *fields], use_bin_type=True)
    return hashlib.sha256(previous + canonical).digest()


class ChainBreak(Exception):
    """The first record at which the chain does not hold; ``seq`` names it."""

    def __init__(self, seq: int, reason: str) -> None:
        self.seq = seq
        self.reason = reason
        super().__init__(f"audit record {seq}: {reason}")


class ChainVerifier:
    """Checks records page by page, in order: each links to the one before and hashes to its stored hash."""

    def __init__(self) -> None:
        self.previous_hash = GENESIS_HASH
        self.last_seq = 0
        self.count = 0
        self.anchor_seq = 0
        # The anchors the trim records checked so far name (their subjects).
        self.trimmed_through: set[int] = set()

    def start_at(self, anchor_seq: int, anchor_hash: bytes) -> None:
        """Begin after an audit trim's anchor: the first record to check is ``anchor_seq + 1`` and links to
        ``anchor_hash`` (what the trail kept of the records it dropped). Only before the first record."""
        if self.count:
            raise ValueError("the anchor is set before any record is checked")
        self.previous_hash, self.last_seq, self.anchor_seq = anchor_hash, anchor_seq, anchor_seq

    def check(self, record: Any) -> None:
        """Raise ChainBreak at the first record that is malformed, out of order or does not hash: its members
        exactly ``RECORD_MEMBERS`` and its hashes in the form a node writes (parse_hash)."""
        expected_seq = self.last_seq + 1
        if not isinstance(record, dict):
            raise ChainBreak(expected_seq, "is not a JSON object")
        seq = record.get("seq")
        if type(seq) is not int or seq != expected_seq:
            raise ChainBreak(expected_seq, "is missing or out of order")
        if record.get("malformed"):
            raise ChainBreak(seq, "cannot be read from the store")
        try:
            fields = [record[name] for name in RECORD_FIELDS]
            previous = parse_hash(record["prev_hash"])
            stored = parse_hash(record["hash"])
        except (KeyError, ValueError):
            raise ChainBreak(seq, "lacks a field or has a malformed hash") from None
        if record.keys() != RECORD_MEMBERS:
            raise ChainBreak(seq, "holds members the chain does not hash")
        if previous != self.previous_hash:
            raise ChainBreak(seq, "does not link to the previous record's hash")
        try:
            digest = chain_hash(previous, seq, fields)
        except (OverflowError, ValueError, TypeError, RecursionError):
            # What no applied record holds: an integer past 64 bits, nesting deeper than msgpack packs, a
            # lone surrogate in a string. The record cannot be hashed, so it cannot be the stored one.
            raise ChainBreak(seq, "holds a value out of range") from None
        if digest != stored:
            raise ChainBreak(seq, "its content does not match its hash")
        self.previous_hash, self.last_seq = stored, seq
        self.count += 1
        subject = record["subject"]
        if record["action"] == TRIM_ACTION and isinstance(subject, str) and subject.isdigit():
            self.trimmed_through.add(int(subject))

    def check_anchor(self, anchor_seq: int) -> None:
        """Once every record is checked: the trail's anchor (0: none) is named by a trim record among them.

        A trim writes its own record (subject: the record it trimmed through) in the entry that sets the
        anchor, always after it, and a later trim that drops it sets an anchor of its own; so a trail whose
        anchor no checked record names had its oldest records removed and an anchor made up for the rest,
        which needs no hash recomputed. Raise ChainBreak at the anchor then."""
        if anchor_seq and anchor_seq not in self.trimmed_through:
            raise ChainBreak(anchor_seq, "the trail's anchor is named by no audit.trim record: the records "
                                         "before it were removed, not trimmed")


def record_document(seq: int, fields: Sequence[Any], previous: bytes, digest: bytes) -> dict[str, Any]:
    """The JSON form of one stored record (GET /v1/admin/audit)."""
    document: dict[str, Any] = {"seq": seq}
    document.update(zip(RECORD_FIELDS, fields))
    document["prev_hash"] = previous.hex()
    document["hash"] = digest.hex()
    return document
