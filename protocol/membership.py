"""Cluster membership: who votes, who only learns, and where each member listens for its peers.

A configuration is carried in the log as a ``CONFIG`` entry whose payload is
the whole new membership (``Membership.encode``). It takes effect on a replica
as soon as the entry is in its log, committed or not, and a truncation that
drops the entry brings the previous one back (Raft thesis §4.1). Changes go one
member at a time: a member is added as a LEARNER (it receives the log and
snapshots but never votes, campaigns or counts in a majority), promoted to
VOTER once it has caught up, or removed. The rules are in docs/replication.md
("Membership").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgpack

# Format 2 (peer protocol version 7) adds each member's ``since``; format 1 payloads (older logs and stores)
# are still read, every member's ``since`` 0.
MEMBERSHIP_FORMAT = 2
MEMBERSHIP_FORMATS_READ = (1, 2)
MAX_SINCE = 2**63 - 1
MAX_MEMBERS = 9
MAX_NODE_ID_BYTES = 64
MAX_ADDRESS_BYTES = 260
MAX_ENCODED_BYTES = 4096


def is_member_id(value: object) -> bool:
    """Whether ``value`` can be a member's id: a string of 1 to MAX_NODE_ID_BYTES bytes."""
    if type(value) is not str:
        return False
    try:
        return 0 < len(value.encode()) <= MAX_NODE_ID_BYTES
    except UnicodeEncodeError:  # a lone surrogate, as JSON may carry
        return False


def is_member_address(value: object) -> bool:
    """Whether ``value`` can be a member's address: a string of at most MAX_ADDRESS_BYTES bytes in UTF-8
    ("" when the static config has it)."""
    if type(value) is not str:
        return False
    try:
        return len(value.encode()) <= MAX_ADDRESS_BYTES
    except UnicodeEncodeError:  # a lone surrogate, as JSON may carry
        return False


class MembershipError(ValueError):
    """A membership that breaks a rule, or a payload that is not one; the message names the rule."""


@dataclass(frozen=True, slots=True)
class Member:
    """One member: its id, the ``host:port`` of its peer listener ("" when the static config has it), its role,
    and ``since``: the index of the configuration entry that added it (0: a member of the bootstrap
    configuration, or one added before format 2). An id removed and added again is a new member with a
    higher ``since``; its peers tell its two lives apart by it (tokenvault/core/incarnations.py)."""

    node_id: str
    address: str
    voter: bool
    since: int = 0


@dataclass(frozen=True, slots=True)
class Membership:
    """A whole configuration, members in id order; at least one voter."""

    members: tuple[Member, ...]
    # Derived once: the core asks for them on every tick and message.
    _voters: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if type(self.members) is not tuple or not 1 <= len(self.members) <= MAX_MEMBERS:
            raise MembershipError(f"a configuration has 1 to {MAX_MEMBERS} members")
        for member in self.members:
            if not is_member_id(member.node_id):
                raise MembershipError(f"a member id is a string of 1 to {MAX_NODE_ID_BYTES} bytes")
            if not is_member_address(member.address):
                raise MembershipError(f"a member address is a string of at most {MAX_ADDRESS_BYTES} bytes in UTF-8")
            if type(member.voter) is not bool:
                raise MembershipError("a member's voter flag is a boolean")
            if type(member.since) is not int or not 0 <= member.since <= MAX_SINCE:
                raise MembershipError(f"a member's since is an integer from 0 to {MAX_SINCE}")
        ids = [member.node_id for member in self.members]
        if len(set(ids)) != len(ids):
            raise MembershipError("member ids must be distinct")
        if ids != sorted(ids):
            raise MembershipError("members must be in id order")
        if not any(member.voter for member in self.members):
            raise MembershipError("a configuration needs at least one voter")
        object.__setattr__(self, "_voters", tuple(member.node_id for member in self.members if member.voter))

    @classmethod
    def of(cls, voters: tuple[str, ...] | list[str], learners: tuple[str, ...] | list[str] = (),
           addresses: dict[str, str] | None = None) -> Membership:
        """Build one from id lists (the static bootstrap configuration, and tests)."""
        addresses = addresses or {}
        members = [Member(node_id, addresses.get(node_id, ""), True) for node_id in voters]
        members += [Member(node_id, addresses.get(node_id, ""), False) for node_id in learners]
        return cls(tuple(sorted(members, key=lambda member: member.node_id)))

    # ------------------------------------------------------------------ reading

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(member.node_id for member in self.members)

    @property
    def voters(self) -> tuple[str, ...]:
        return self._voters

    @property
    def learners(self) -> tuple[str, ...]:
        return tuple(member.node_id for member in self.members if not member.voter)

    @property
    def quorum(self) -> int:
        """How many voters make a majority."""
        return len(self._voters) // 2 + 1

    def is_voter(self, node_id: str) -> bool:
        return node_id in self._voters

    def member(self, node_id: str) -> Member | None:
        return next((member for member in self.members if member.node_id == node_id), None)

    # ------------------------------------------------------------------ the three changes

    def with_learner(self, node_id: str, address: str) -> Membership:
        if self.member(node_id) is not None:
            raise MembershipError(f"{node_id} is already a member")
        members = sorted(self.members + (Member(node_id, address, False),), key=lambda member: member.node_id)
        return Membership(tuple(members))

    def promoted(self, node_id: str) -> Membership:
        member = self.member(node_id)
        if member is None or member.voter:
            raise MembershipError(f"{node_id} is not a learner")
        return Membership(tuple(Member(m.node_id, m.address, True, m.since) if m.node_id == node_id else m
                                for m in self.members))

    def without(self, node_id: str) -> Membership:
        if self.member(node_id) is None:
            raise MembershipError(f"{node_id} is not a member")
        return Membership(tuple(member for member in self.members if member.node_id != node_id))

    def added_at(self, before: Membership, index: int) -> Membership:
        """This configuration as the entry at ``index`` carries it, following ``before``: each member
        ``before`` does not have gets ``since`` = ``index``; the others keep the ``since`` they have there."""
        known = {member.node_id: member.since for member in before.members}
        return Membership(tuple(Member(m.node_id, m.address, m.voter, known.get(m.node_id, index))
                                for m in self.members))

    def since(self, node_id: str) -> int | None:
        """The ``since`` of member ``node_id``; None when it is no member."""
        member = self.member(node_id)
        return None if member is None else member.since

    def differs_by_one_member(self, other: Membership) -> bool:
        """True when exactly one member is added, removed, or changes its role (one server at a time)."""
        mine, theirs = set(self.members), set(other.members)
        changed_ids = {member.node_id for member in mine ^ theirs}
        return len(changed_ids) == 1

    # ------------------------------------------------------------------ encoding

    def encode(self) -> bytes:
        body = [MEMBERSHIP_FORMAT, [[m.node_id, m.address, m.voter, m.since] for m in self.members]]
        packed: bytes = msgpack.packb(body, use_bin_type=True)
        return packed

    @classmethod
    def decode(cls, payload: bytes) -> Membership:
        """The membership in a CONFIG entry's payload; MembershipError if it is not a valid one."""
        if type(payload) is not bytes or not 0 < len(payload) <= MAX_ENCODED_BYTES:
            raise MembershipError(f"a configuration payload has 1 to {MAX_ENCODED_BYTES} bytes")
        try:
            body = msgpack.unpackb(payload, raw=False, use_list=True, strict_map_key=True,
                                   max_array_len=MAX_MEMBERS + 2, max_map_len=0,
                                   max_str_len=MAX_ADDRESS_BYTES, max_bin_len=0)
        except (ValueError, TypeError):
            raise MembershipError("a configuration payload is not msgpack") from None
        if (type(body) is not list or len(body) != 2 or type(body[0]) is not int
                or body[0] not in MEMBERSHIP_FORMATS_READ or type(body[1]) is not list):
            raise MembershipError("a configuration payload is not [format, members]")
        fields = 3 if body[0] == 1 else 4
        members = []
        for item in body[1]:
            if type(item) is not list or len(item) != fields:
                raise MembershipError("a member is [id, address, voter]" if fields == 3
                                      else "a member is [id, address, voter, since]")
            members.append(Member(*item))
        return cls(tuple(members))


class ConfigurationLog:
    """The configurations one replica's log holds: the one at the log base and each CONFIG entry above it.

    The last one is in effect, committed or not; a truncation that drops an
    entry brings back the one before it; compaction moves the last one at or
    below the new base into the base; a snapshot replaces them all with the
    snapshot's (None: the store never applied one, so the bootstrap holds).
    """

    __slots__ = ("_bootstrap", "_base", "_held")

    def __init__(self, bootstrap: Membership, base: Membership | None) -> None:
        self._bootstrap = bootstrap
        self._base = base or bootstrap
        self._held: list[tuple[int, Membership]] = []

    @property
    def current(self) -> Membership:
        return self._held[-1][1] if self._held else self._base

    @property
    def previous(self) -> Membership:
        """The configuration before the one in effect (the base's when only one entry is held)."""
        return self._held[-2][1] if len(self._held) > 1 else self._base

    @property
    def base(self) -> Membership:
        return self._base

    @property
    def last_index(self) -> int | None:
        """Where the entry of the configuration in effect stands; None when it is the base's."""
        return self._held[-1][0] if self._held else None

    @property
    def indexes(self) -> tuple[int, ...]:
        return tuple(index for index, _ in self._held)

    def held(self) -> tuple[tuple[int, Membership], ...]:
        return tuple(self._held)

    def note(self, index: int, payload: bytes) -> None:
        """A CONFIG entry at ``index`` joined the log (MembershipError if its payload is not a configuration)."""
        self._held.append((index, Membership.decode(payload)))

    def truncate_from(self, index: int) -> bool:
        """The log dropped its entries from ``index`` on; True if the configuration in effect changed."""
        if not self._held or self._held[-1][0] < index:
            return False
        self._held = [(at, membership) for at, membership in self._held if at < index]
        return True

    def compact_to(self, index: int) -> None:
        while self._held and self._held[0][0] <= index:
            self._base = self._held.pop(0)[1]  # the store applied it: it is the base's now

    def reset(self, base: Membership | None) -> None:
        """The log was replaced by a snapshot recording ``base`` (None: the bootstrap configuration)."""
        self._held.clear()
        self._base = base or self._bootstrap
