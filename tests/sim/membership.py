"""Membership changes in the simulation (a mixin of simulator.Simulation).

A run with ``membership_weight`` above zero has its primary add a learner (a
fresh node with an empty disk), promote a learner, or remove a member (a live
one, a crashed one, or the primary itself), one member at a time, amid the
other nemeses. A member whose removal committed is, half of the time, retired
(stopped for good, as ``run_cluster.sh remove-node`` does); otherwise it runs
on outside the configuration. The membership-aware invariants live in
invariants.py; docs/replication.md ("Membership") describes both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from protocol import Entry, EntryKind, Membership, MembershipError, NotPrimary, ProposalRejected, Replica, Role

if TYPE_CHECKING:
    from simulator import Disk, SimNode

# The most node ids a run creates (the first cluster_size of them at the start).
MAX_SIMULATED_NODES = 8
# The most members (voters and learners) a configuration of the sweep holds at once.
MAX_SIMULATED_MEMBERS = 6
# A learner this close to the commit index is offered for promotion.
CAUGHT_UP_SLACK_ENTRIES = 2


def memberships_on_disk(disk: Disk, bootstrap: Membership) -> tuple[Membership, Membership | None, int]:
    """What a node would start with from its disk: the configuration in effect (the last one in its log,
    else its store's), the one before it when the last is in the log, and where the last stands."""
    held = [(entry.index, Membership.decode(entry.payload)) for entry in disk.entries
            if entry.kind is EntryKind.CONFIG and entry.index > disk.applied_index]
    base = disk.applied_membership or bootstrap
    if not held:
        return base, None, 0
    previous = held[-2][1] if len(held) > 1 else base
    return held[-1][1], previous, held[-1][0]


def may_campaign_on_disk(node_id: str, disk: Disk, bootstrap: Membership) -> bool:
    """Replica.may_campaign for a node that is down, from what its disk would restore."""
    current, previous, index = memberships_on_disk(disk, bootstrap)
    if current.is_voter(node_id):
        return True
    commit_index = max(disk.hard_state.commit_index, disk.applied_index)
    return previous is not None and index > commit_index and previous.is_voter(node_id)


class MembershipChanges:
    """Needs the Simulation's nodes, rng, client and driver."""

    def change_membership(self) -> None:
        """The primary proposes one change: add a learner, promote one, or remove a member."""
        primaries = [node for node in self.live_primaries() if self._serves_reads(node.replica)]
        if not primaries:
            return
        node = self.rng.choice(primaries)
        replica = node.replica
        membership = replica.membership
        # As an operator's tool does, a learner is promoted once it looks caught up (the core has the last
        # word), and a new one is added only while none is catching up.
        progress = replica.progress()
        caught_up = [learner for learner in membership.learners
                     if progress.get(learner, (0, 0))[0] + CAUGHT_UP_SLACK_ENTRIES >= replica.commit_index]
        choices = []
        if (len(membership.ids) < MAX_SIMULATED_MEMBERS and len(self.nodes) < MAX_SIMULATED_NODES
                and (not membership.learners or self.rng.random() < 0.2)):
            choices.append("add")
        if caught_up:
            choices += ["promote"] * 4
        if membership.learners:
            choices.append("remove-learner")
        if len(membership.voters) > 1:
            choices.append("remove")
        if not choices:
            return
        choice = self.rng.choice(choices)
        if choice == "add":
            joining = self.join_node(membership)
            proposed = membership.with_learner(joining, f"sim:{joining}")
        elif choice == "promote":
            proposed = membership.promoted(self.rng.choice(caught_up))
        elif choice == "remove-learner":
            proposed = membership.without(self.rng.choice(membership.learners))
        else:
            proposed = membership.without(self.rng.choice(membership.voters))
        try:
            index, view = replica.propose_membership(proposed)
        except (NotPrimary, ProposalRejected) as refusal:
            self.note(f"{node.node_id} refused a membership change ({choice}): {refusal}")
            return
        self.membership_changes += 1
        self.note(f"{node.node_id} proposed {choice} at {index}/{view}: voters {proposed.voters} "
                  f"learners {proposed.learners}")
        self.drive(node)

    def join_node(self, membership: Membership) -> str:
        """Create a node with an empty disk that knows the voters and itself as a learner (as add-node
        writes its static config); it is started at once."""
        from simulator import SimNode  # the mixin is imported by simulator.py itself

        node_id = f"n{len(self.nodes) + 1}"
        node = SimNode(node_id, None)
        node.bootstrap = (membership.voters, (node_id,))
        self.nodes[node_id] = node
        self.member_ids = self.member_ids + (node_id,)
        self.partition_of[node_id] = 0
        node.replica = self._start_replica(node)
        self.note(f"{node_id} created with an empty disk")
        return node_id

    def replace_a_member(self) -> SimNode | None:
        """On the healed cluster, as run_cluster.sh add-node and remove-node do: a node with an empty disk
        joins as a learner, is promoted once caught up, a voter (the primary, half of the time) is
        removed and stopped, then another voter crashes if the rest still make a majority. Each step
        must finish within the liveness bound."""
        joining: list[str] = []

        def propose(build) -> bool:
            primaries = self.live_primaries()
            if len(primaries) != 1:
                return False
            try:
                index, _ = primaries[0].replica.propose_membership(build(primaries[0].replica))
            except (NotPrimary, ProposalRejected, MembershipError):
                return False
            self.membership_changes += 1
            self.drive(primaries[0])
            self.note(f"healed cluster: change at {index}")
            return True

        def add(replica: Replica) -> Membership:
            if not joining:
                joining.append(self.join_node(replica.membership))
            return replica.membership.with_learner(joining[0], f"sim:{joining[0]}")

        def remove_voter(replica: Replica) -> Membership:
            voters = [voter for voter in replica.membership.voters if voter != joining[0]]
            victim = replica.node_id if replica.node_id in voters and self.rng.random() < 0.5 else voters[0]
            return replica.membership.without(victim)

        if len(self.nodes) >= MAX_SIMULATED_NODES + 2 or any(
                len(node.replica.membership.ids) >= MAX_SIMULATED_MEMBERS for node in self.live_primaries()):
            return None
        for step_name, build in (("add", add), ("promote", lambda replica: replica.membership.promoted(joining[0])),
                                 ("remove", remove_voter)):
            for _ in range(self.config.liveness_bound_ticks):
                self.healed_tick()
                if propose(build):
                    break
            else:
                self.fail(f"healed cluster: the {step_name} step of a replacement was never accepted")
            self._wait_committed(step_name)
        self.replacements += 1
        members = self.final_members()
        voters = [node for node in members
                  if node.replica is not None and node.replica.membership.is_voter(node.node_id)]
        if len(voters) < 3:
            return None
        crashed = self.rng.choice(voters)
        self.crash(crashed)
        return crashed

    def _wait_committed(self, step_name: str) -> None:
        for _ in range(self.config.liveness_bound_ticks):
            self.healed_tick()
            primaries = self.live_primaries()
            if len(primaries) == 1 and primaries[0].replica.membership_index <= primaries[0].replica.commit_index:
                return
        self.fail(f"healed cluster: the {step_name} step of a replacement never committed")

    def bootstrap_membership(self, node: SimNode) -> Membership:
        voters, learners = node.bootstrap or (self.initial_ids, ())
        return Membership.of(voters, learners)

    def note_committed_config(self, entry: Entry) -> None:
        """A configuration entry committed (first seen applied): it becomes the committed configuration,
        and a member it leaves out is, half of the time, stopped for good."""
        if entry.index <= self.committed_membership_index:
            return
        membership = Membership.decode(entry.payload)
        removed = set(self.committed_membership.ids) - set(membership.ids)
        self.committed_membership, self.committed_membership_index = membership, entry.index
        for node_id in sorted(removed):
            if self.rng.random() < 0.5:
                self.retiring.add(node_id)  # stopped at the start of the next step, not inside this drive

    def retire_pending(self) -> None:
        for node_id in sorted(self.retiring):
            node = self.nodes[node_id]
            if node.replica is not None:
                self.crash(node)
            self.retired.add(node_id)
            self.member_ids = tuple(member for member in self.member_ids if member != node_id)
            self.note(f"{node_id} retired: removed from the configuration and stopped for good")
        self.retiring.clear()

    def final_members(self) -> list[SimNode]:
        """The nodes the liveness check waits for: the members of the configuration of the most up-to-date
        live log (the one a healed cluster's primary holds; a node left out by a truncated change may
        hold a later-numbered but superseded one), or the newest committed one when no node runs."""
        live = [node for node in self.nodes.values() if node.replica is not None]
        if live:
            newest = max(live, key=lambda node: (node.replica.last_view, node.replica.last_index))
            members = newest.replica.membership.ids
        else:
            members = self.committed_membership.ids
        return [self.nodes[node_id] for node_id in members if node_id not in self.retired]

    @staticmethod
    def counted_voter_sets(replica: Replica, index: int) -> tuple[tuple[str, ...], ...]:
        """The voters a primary may have counted when it committed ``index``: those of the configuration in
        effect at that index and of every later one in its log (a primary counts with its newest one, and
        a change may have been appended between the commit and this apply)."""
        held = replica.configurations.held()
        in_effect = [membership for at, membership in held if at <= index]
        sets = [in_effect[-1].voters if in_effect else replica.configurations.base.voters]
        sets += [membership.voters for at, membership in held if at > index]
        return tuple(sets)

    def configuration_of(self, node: SimNode) -> Membership:
        """The configuration a node campaigns and counts with: its live replica's, else its disk's."""
        if node.replica is not None:
            return node.replica.membership
        return memberships_on_disk(node.disk, self.bootstrap_membership(node))[0]

    def may_campaign(self, node: SimNode) -> bool:
        if node.replica is not None:
            return node.replica.may_campaign
        return may_campaign_on_disk(node.node_id, node.disk, self.bootstrap_membership(node))

    def check_one_change_at_a_time(self, node: SimNode) -> None:
        replica = node.replica
        assert replica is not None and replica.role is Role.PRIMARY
        # A new primary may hold changes of earlier views it has not seen committed yet; but one it
        # proposed itself found every earlier change committed, and nothing may follow it until it is.
        uncommitted = [index for index in replica.configurations.indexes if index > replica.commit_index]
        own = [index for index in uncommitted if replica.log_entry(index).view == replica.view]
        if own and len(uncommitted) > 1:
            self.fail(f"primary {node.node_id} of view {replica.view} holds uncommitted configuration entries "
                      f"{uncommitted}, its own among them: more than one change at a time")
