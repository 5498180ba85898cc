"""The invariants the simulation checks after every step (a mixin of simulator.Simulation).

They are written up in docs/replication.md ("The simulation" and "Nemeses").
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from protocol import Entry, Role

if TYPE_CHECKING:
    from simulator import Disk, SimNode


class InvariantChecks:
    """Needs the Simulation's bookkeeping (nodes, acknowledged, ...); raises through ``fail``."""

    def _check_primary_holds_acknowledged(self, node: SimNode) -> None:
        """A primary of view v holds every entry acknowledged by a primary of an earlier view."""
        replica = node.replica
        assert replica is not None
        for index, (view, payload, commit_view) in self.acknowledged.items():
            if commit_view >= replica.view or index <= replica.log_base_index:
                continue  # compacted: the store holds it, checked by the digest chain
            if index > replica.last_index:
                self.fail(f"new primary {node.node_id} lacks acknowledged entry {index}")
            entry = replica.log_entry(index)
            if (entry.view, entry.payload) != (view, payload):
                self.fail(f"new primary {node.node_id} holds {entry.index}/{entry.view} over acknowledged {index}/{view}")

    def _log_position(self, node: SimNode) -> tuple[int, int]:
        """(last view, last index) a node would campaign and vote with: its live log, else its disk."""
        if node.replica is not None:
            return node.replica.last_view, node.replica.last_index
        disk = node.disk
        if disk.applied_index > disk.last_index:
            return disk.applied_view, disk.applied_index
        return (disk.entries[-1].view if disk.entries else disk.base_view), disk.last_index

    def _holds(self, node: SimNode, index: int, view: int) -> bool:
        replica, disk = node.replica, node.disk
        if replica is not None:
            if index <= replica.log_base_index:
                return True
            return index <= replica.last_index and replica.log_entry(index).view == view
        if index <= max(disk.base_index, disk.applied_index):
            return True
        return index <= disk.last_index and disk.entries[index - disk.base_index - 1].view == view

    def _check_no_electable_node_lacks(self, index: int, view: int) -> None:
        """Leader completeness, looked at from the front: once an entry is committed, no replica
        lacking it may be at least as up to date as a majority of the voters of its own
        configuration (the one it would campaign with), or it could be elected and overwrite the
        entry. (Raft's proof of leader completeness, with one change at a time, shows this holds.)
        A retired node never runs again and neither campaigns nor votes."""
        running = {node_id: node for node_id, node in self.nodes.items() if node_id not in self.retired}
        positions = {node_id: self._log_position(node) for node_id, node in running.items()}
        for node_id, node in running.items():
            if self._holds(node, index, view):
                continue
            if not self.may_campaign(node):
                continue  # a learner, or a member whose removal committed, never campaigns
            configuration = self.configuration_of(node)
            position = positions[node_id]
            voters = sum(1 for voter in configuration.voters if voter in positions and position >= positions[voter])
            if voters >= configuration.quorum:
                self.fail(f"{node_id} lacks committed entry {index}/{view} yet could win an election "
                          f"(log at {position}, {voters} of its voters {configuration.voters} no more up to date)")

    def _check_read(self, node: SimNode, result) -> None:
        asked = self.read_floor.pop((node.node_id, result.request_id), None)
        if asked is None or not result.ok:
            self.record_read_dropped(node.node_id, result.request_id)
            return
        floor, on_backup = asked
        self.reads_confirmed += 1
        self.backup_reads_confirmed += on_backup
        # The client history (client_history.py) gets the read too, for the linearizability check.
        self.record_read_confirmed(node.node_id, result.request_id, result.read_index)
        if result.read_index < floor and self.check_reads_in_real_time:
            self.fail(f"{node.node_id} read index {result.read_index} misses acknowledged index {floor}: stale read")

    def _check_log_matching(self, node: SimNode, entry: Entry) -> None:
        """Log matching across every disk: one (index, view) names one payload and one predecessor view,
        so by induction two logs that share an entry share the whole prefix before it."""
        disk = node.disk
        prev_view = disk.entries[-1].view if disk.entries else disk.base_view
        known = self.entries_on_disk.setdefault((entry.index, entry.view), (entry.payload, prev_view))
        if known != (entry.payload, prev_view):
            self.fail(f"{node.node_id} writes entry {entry.index}/{entry.view} (after view {prev_view}) unlike "
                      f"another disk's (after view {known[1]}, {'same' if known[0] == entry.payload else 'other'} "
                      f"payload): log matching broken")

    @staticmethod
    def _disk_holds(disk: Disk, index: int, view: int) -> bool:
        """Whether this disk alone would bring back entry (index, view) after a crash."""
        if index <= max(disk.base_index, disk.store_synced[0]):
            return True  # below the log base or within the synced store: the store holds its effect
        return index <= disk.last_index and disk.entries[index - disk.base_index - 1].view == view

    def _check_acknowledged_durable(self) -> None:
        """Every acknowledged entry is durable on the disks of a majority of the voters its primary
        counted (the configuration in effect on that primary: majorities are the configuration's).
        Entries that such a majority's stores already hold are settled for good (store floors only
        grow) and skipped from then on, which keeps this cheap."""
        indexes = self.acknowledged_indexes
        if self.acknowledged_settled >= len(indexes):
            return
        floors = {node_id: max(node.disk.base_index, node.disk.store_synced[0]) for node_id, node in self.nodes.items()}
        while self.acknowledged_settled < len(indexes):
            index = indexes[self.acknowledged_settled]
            if not any(sum(1 for voter in voters if floors[voter] >= index) >= len(voters) // 2 + 1
                       for voters in self._voter_sets(index)):
                break
            self.acknowledged_settled += 1
        for index in indexes[self.acknowledged_settled:]:
            view = self.acknowledged[index][0]
            best = ""
            for voters in self._voter_sets(index):
                quorum = len(voters) // 2 + 1
                holders = sum(1 for voter in voters if self._disk_holds(self.nodes[voter].disk, index, view))
                if holders >= quorum:
                    break
                best = f"{holders} disk(s) of the voters {voters}, fewer than a majority of {quorum}"
            else:
                self.fail(f"acknowledged entry {index}/{view} is durable on {best}")

    def _voter_sets(self, index: int) -> tuple[tuple[str, ...], ...]:
        return self.acknowledged_voters.get(index) or (tuple(self.initial_ids),)

    def _check_vote(self, voter: str, candidate: str, view: int) -> None:
        granted = self.votes_granted.setdefault((voter, view), candidate)
        if granted != candidate:
            self.fail(f"{voter} granted its vote in view {view} to {granted} and to {candidate}: votes twice")

    def check_step_invariants(self) -> None:
        self._check_acknowledged_durable()
        for node in self.nodes.values():
            replica = node.replica
            if replica is None:
                continue
            if replica.role is Role.PRIMARY:
                holder = self.primary_of_view.setdefault(replica.view, node.node_id)
                if holder != node.node_id:
                    self.fail(f"two primaries in view {replica.view}: {holder} and {node.node_id}")
                self.check_one_change_at_a_time(node)
                if (node.node_id, replica.view) not in self.checked_primaries:
                    # Its log only grows while it leads this view, so checking once is enough.
                    self.checked_primaries.add((node.node_id, replica.view))
                    self._check_primary_holds_acknowledged(node)
            if replica.commit_index < node.disk.applied_index and node.pending is None:
                self.fail(f"{node.node_id} commit {replica.commit_index} behind its applied {node.disk.applied_index}")
