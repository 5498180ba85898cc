"""The nemeses of the sweep beyond loss, delay and two-group partitions (a mixin of simulator.Simulation).

One-way cuts, bridges, the primary isolated in a minority while the client
writes and reads on every node that believes it leads, links slower than an
election timeout, process pauses, and the fault budget that most runs stay
within. docs/replication.md ("Nemeses") describes each.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from protocol import Replica, Role

if TYPE_CHECKING:
    from simulator import SimNode


class Nemeses:
    """Needs the Simulation's network state (blocked, slow_links, isolation) and its client."""

    def _may_take_down(self, node: SimNode) -> bool:
        """The fault budget: within it, at most f nodes (at least one) are down or paused at once."""
        if self.config.beyond_budget:
            return True
        isolated = self.isolated_nodes if self.now_ticks < self.isolated_until_ticks else set()
        if node.node_id in isolated:
            return False  # the isolated primary must live on, believing it leads: that is the test
        out = sum(1 for other in self.nodes.values() if other is not node and other.node_id not in self.retired and (
            other.replica is None or self.is_paused(other) or other.node_id in isolated))
        return out < max(1, self.fault_tolerance)

    def _cut(self, group: set[str], others: set[str]) -> None:
        self.blocked.update((a, b) for a in group for b in others)
        self.blocked.update((b, a) for a in group for b in others)

    def link_fault(self) -> None:
        """One of: a one-way cut, a bridge partition, or the primary isolated in a minority."""
        if len(self.member_ids) < 2:
            return
        if self.now_ticks < self.isolated_until_ticks:
            return  # the primary's isolation runs its full course
        self.link_faults += 1
        rng = self.rng
        self.blocked.clear()  # one link fault at a time, so that most runs still make progress
        kind = rng.random()
        if kind < 0.35:
            source, destination = rng.sample(self.member_ids, 2)
            self.blocked.add((source, destination))
            self.note(f"one-way cut {source} -> {destination}")
        elif kind < 0.6 and len(self.member_ids) >= 3:
            # A bridge: two sides that cannot hear each other, and one node that hears both.
            bridge, *rest = rng.sample(self.member_ids, len(self.member_ids))
            split = rng.randrange(1, len(rest))
            left, right = set(rest[:split]), set(rest[split:])
            self._cut(left, right)
            self.note(f"bridge {bridge} between {sorted(left)} and {sorted(right)}")
        else:
            self.isolate_primary()

    def isolate_primary(self) -> None:
        """Cut the primary of the highest view into a minority for 3 to 5 election timeouts
        (counted on the slowest clock), while the client keeps writing and reading on it."""
        # A primary that committed in its view serves reads: isolating that one is the test.
        primaries = [node for node in self.live_primaries() if self._serves_reads(node.replica)]
        if len(self.member_ids) < 3:
            return
        if not primaries:
            # Often no primary serves just now (an election, a partition): the isolation waits
            # for the next one (step() retries it), so that it is not wasted.
            self.isolation_armed = True
            return
        self.isolation_armed = False
        primary = max(primaries, key=lambda node: node.replica.view)  # type: ignore[union-attr]
        others = [node_id for node_id in self.member_ids if node_id != primary.node_id]
        minority = {primary.node_id, *self.rng.sample(others, self.rng.randrange(0, max(1, self.fault_tolerance)))}
        majority = set(self.member_ids) - minority
        # The majority side is whole (within the budget, the minority is all the faults there
        # are), so that it elects a new primary while the old one still believes it leads.
        for node_id in sorted(majority):
            node = self.nodes[node_id]
            node.paused_until_ticks = min(node.paused_until_ticks, self.now_ticks)
            if node.replica is None and not self.config.beyond_budget:
                self.restart(node)
        self.isolated_nodes = minority
        self.blocked.clear()
        self.partition_of = {node_id: 0 for node_id in self.member_ids}
        self._cut(minority, majority)
        slowest = min(node.tick_rate for node in self.nodes.values())
        timeouts = self.rng.randint(3, 5)
        self.isolated_until_ticks = self.now_ticks + int(timeouts * self.config.election_timeout_ticks / slowest) + 1
        self.note(f"primary {primary.node_id} isolated in {sorted(minority)} until t={self.isolated_until_ticks}")

    def slow_link(self) -> None:
        """A link (one way or both) whose messages take longer than an election timeout."""
        if len(self.member_ids) < 2:
            return
        source, destination = self.rng.sample(self.member_ids, 2)
        timeout = self.config.election_timeout_ticks
        self.slow_links.clear()
        delay = self.rng.randint(timeout + 1, 3 * timeout)
        self.slow_links[(source, destination)] = delay
        if self.rng.random() < 0.5:
            self.slow_links[(destination, source)] = delay
        self.note(f"slow link {source} -> {destination}: +{delay} ticks")

    def pause(self) -> None:
        """A process pause: the node stops ticking and handling messages for 1 to 4 election timeouts."""
        running = [node for node in self.nodes.values()
                   if node.replica is not None and not self.is_paused(node) and self._may_take_down(node)]
        if not running:
            return
        node = self.rng.choice(running)
        node.paused_until_ticks = self.now_ticks + self.rng.randint(1, 4) * self.config.election_timeout_ticks
        self.pauses += 1
        self.note(f"{node.node_id} paused until t={node.paused_until_ticks}")

    @staticmethod
    def _serves_reads(replica: Replica | None) -> bool:
        """A primary whose commit point is of its own view (its no-op committed). The log's own
        view_at is used because the commit point may sit at the compacted base."""
        return (replica is not None and replica.role is Role.PRIMARY
                and replica._log.view_at(replica.commit_index) == replica.view)

    def _superseded(self, node: SimNode) -> bool:
        """A node that believes it leads while some replica has moved to a later view."""
        assert node.replica is not None
        return any(other.replica is not None and other.replica.view > node.replica.view
                   for other in self.nodes.values())

    def client_round(self) -> None:
        """While a primary is isolated, the client sends a write and a read to every node that
        believes it leads (as a client that does not know who leads would)."""
        for node in self.live_primaries():
            if node.replica is None or node.replica.role is not Role.PRIMARY:
                continue  # an earlier step of this round deposed or crashed it
            if self._superseded(node):
                self.superseded_reads += 1
            self.ask_read(node)
            if node.replica is not None and node.replica.role is Role.PRIMARY:
                self.propose(node)
