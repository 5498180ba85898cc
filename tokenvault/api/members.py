"""Membership changes as the service offers them: list, add (as a learner), promote, remove.

NodeService takes these methods in (a mixin), so the HTTP layer calls them like
any other service method with plain arguments; a node that is not the primary
forwards the change to it, as other admin writes. The rules a change must pass
(one at a time, a learner promoted only once caught up) are the core's
(protocol/replica.py, docs/replication.md "Membership"); this layer validates
the request and says why a change was refused.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from protocol import Membership, MembershipError, NotPrimary, ProposalRejected, Role
from protocol.membership import is_member_address
from tokenvault.config import NODE_ID_PATTERN, ConfigError, split_host_port
from tokenvault.core.node import NodeBusy, ProposalLost, ProposalOutcomeUnknown
from tokenvault.errors import InvalidRequest, MembershipChangeRefused, Outcome, Overloaded, Unavailable
from tokenvault.logs import get_logger

log = get_logger("service")

LIST_MEMBERS = "members"
CHANGE_MEMBER = "member.change"
MEMBER_ACTIONS = ("add", "promote", "remove")
# Refusals that go away by themselves (a change still committing, a learner still catching up): retry.
RETRY_AFTER_SECONDS = 1


def validate_member_change(action: object, node_id: object, peer_addr: object) -> tuple[str, str, str | None]:
    """The checked arguments of a change (400 naming the field, never echoing it)."""
    if action not in MEMBER_ACTIONS:
        raise InvalidRequest(f"action must be one of {', '.join(MEMBER_ACTIONS)}")
    if not isinstance(node_id, str) or len(node_id) > 32 or not NODE_ID_PATTERN.match(node_id):
        raise InvalidRequest("node_id must be 1-32 characters of [A-Za-z0-9_.-] starting with a letter or digit")
    if action != "add":
        if peer_addr is not None:
            raise InvalidRequest("peer_addr is given only to add a member")
        return str(action), node_id, None
    # is_member_address: at most MAX_ADDRESS_BYTES in UTF-8, which a lone surrogate (valid JSON) has no form in.
    if not isinstance(peer_addr, str) or not peer_addr or not is_member_address(peer_addr):
        raise InvalidRequest("peer_addr must be host:port")
    try:
        split_host_port("peer_addr", peer_addr)
    except ConfigError:
        raise InvalidRequest("peer_addr must be host:port") from None
    return str(action), node_id, peer_addr


def _change(action: str, node_id: str, peer_addr: str | None) -> Callable[[Membership], Membership]:
    def build(current: Membership) -> Membership:
        if action == "add":
            return current.with_learner(node_id, peer_addr or "")
        if action == "promote":
            return current.promoted(node_id)
        return current.without(node_id)
    return build


class MembershipOperations:
    """Mixed into NodeService: needs its node, _route, _read_barrier and _timeout_seconds."""

    node: Any
    _timeout_seconds: float

    if TYPE_CHECKING:  # NodeService's own, which these methods use
        async def _route(self, kind: str, arguments: dict[str, Any],
                         local: Callable[..., Awaitable[Any]]) -> Any: ...

        async def _read_barrier(self) -> None: ...

        async def _refuse_revoked_key_id(self, key_id: str | None) -> None: ...

    async def list_members(self, key_id: str | None = None) -> dict[str, Any]:
        """The configuration in effect on the primary (after a read barrier), with each member's progress.
        ``key_id``: the runtime key that asked (None: a bootstrap key), checked here as for a change."""
        await self._refuse_revoked_key_id(key_id)
        members: dict[str, Any] = await self._route(LIST_MEMBERS, {}, self._list_members_here)
        return members

    async def change_member(self, action: str, node_id: str, peer_addr: str | None,
                            key_id: str | None = None) -> Outcome:
        """Add (as a learner), promote or remove one member; answered once the change is committed.

        ``key_id``: the runtime key that asked (None: a bootstrap key). A forwarded change names no key, so
        this node checks it, after a read barrier (a backup's read index) that applies every revocation
        acknowledged before the request started: 401 if it is gone (docs/security.md, "Revocation")."""
        action, node_id, peer_addr = validate_member_change(action, node_id, peer_addr)
        await self._refuse_revoked_key_id(key_id)
        arguments = {"action": action, "node_id": node_id, "peer_addr": peer_addr}
        outcome: Outcome = await self._route(CHANGE_MEMBER, arguments, self._change_member_here)
        return outcome

    async def _list_members_here(self) -> dict[str, Any]:
        await self._read_barrier()
        replica = self.node.replica
        progress = replica.progress() if replica.role == Role.PRIMARY else {}
        members = []
        for member in replica.membership.members:
            match_index = replica.commit_index if member.node_id == self.node.node_id else (
                progress[member.node_id][0] if member.node_id in progress else None)
            members.append({"id": member.node_id, "peer_addr": member.address or None,
                            "role": "voter" if member.voter else "learner", "match_index": match_index,
                            "added_at_index": member.since})
        return {"primary_id": replica.primary_id, "configuration_index": replica.membership_index,
                "committed": replica.membership_index <= replica.commit_index,
                "commit_index": replica.commit_index, "members": members}

    async def _change_member_here(self, action: str, node_id: str, peer_addr: str | None) -> Outcome:
        if action == "add" and self.node.transport is None:
            raise MembershipChangeRefused("this node runs without peer links (a cluster started with one node "
                                          "has none): it cannot feed a new member; start a cluster of 3")
        try:
            index = await self.node.change_membership(_change(action, node_id, peer_addr), self._timeout_seconds)
        except MembershipError as error:
            raise MembershipChangeRefused(str(error)) from None
        except ProposalRejected as rejected:
            raise MembershipChangeRefused(f"the primary refused the change: {rejected.reason}",
                                          headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
        except (asyncio.TimeoutError, ProposalOutcomeUnknown):
            raise Unavailable("the change was not committed in time; it may still take effect: list the "
                              "members to see") from None
        except ProposalLost:
            raise Unavailable("the primary changed before the change committed; it had no effect",
                              no_effect=True) from None
        except NodeBusy:
            raise Overloaded("the primary's work queue is full; the change had no effect: retry later") from None
        except NotPrimary:
            raise
        membership = self.node.replica.membership
        log.info("membership.changed_by_request", action=action, member=node_id, index=index)
        body = {"action": action, "node_id": node_id, "configuration_index": index,
                "voters": list(membership.voters), "learners": list(membership.learners)}
        return Outcome(201 if action == "add" else 200, json.dumps(body).encode(), False)

    async def run_forwarded_member_request(self, kind: str, arguments: dict[str, Any]) -> tuple[int, bytes]:
        """A backup's forwarded list or change, checked as the HTTP layer checks it."""
        if kind == LIST_MEMBERS:
            return 200, json.dumps(await self._list_members_here()).encode()
        action, node_id, peer_addr = validate_member_change(arguments["action"], arguments["node_id"],
                                                            arguments["peer_addr"])
        outcome = await self._change_member_here(action, node_id, peer_addr)
        return outcome.status, outcome.body
