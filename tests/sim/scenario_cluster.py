"""A hand-driven Simulation for the named scenarios: a perfect network unless told otherwise.

The scenarios decide which node ticks, which messages arrive and who crashes;
the same invariant checks as in the random sweep run after every step.
"""

from __future__ import annotations

from collections.abc import Callable

from protocol import Message, Replica, Role
from simulator import MESSAGES_PER_TICK_LIMIT, SimNode, Simulation, SimulationConfig


class ScenarioCluster(Simulation):
    def __init__(self, size: int, *, seed: int = 1, replica_class: type[Replica] = Replica,
                 driver_bugs: frozenset[str] = frozenset(), **overrides) -> None:
        settings = dict(loss_probability=0.0, duplicate_probability=0.0, max_delay_ticks=0,
                        split_ready_probability=0.0)
        settings.update(overrides)
        config = SimulationConfig(cluster_size=size, **settings)  # type: ignore[arg-type]
        super().__init__(seed, config, replica_class, driver_bugs)

    def node(self, node_id: str) -> SimNode:
        return self.nodes[node_id]

    def replica(self, node_id: str) -> Replica:
        replica = self.nodes[node_id].replica
        assert replica is not None, f"{node_id} is down"
        return replica

    def deliver_all(self, keep: Callable[[str, str, Message], bool] | None = None) -> None:
        """Deliver queued messages until none is left; ``keep`` may drop some (return False)."""
        for _ in range(MESSAGES_PER_TICK_LIMIT):
            if not self.deliverable:
                break
            source, destination, message = self.deliverable.pop(0)
            if keep is not None and not keep(source, destination, message):
                continue
            node = self.nodes[destination]
            if node.replica is None or not self.link_open(source, destination):
                continue
            node.replica.step(source, message)
            self.drive(node)
        else:
            self.fail("message storm")
        self.check_step_invariants()

    def run_ticks(self, ticks: int, only: tuple[str, ...] | None = None) -> None:
        for _ in range(ticks):
            self.now_ticks += 1
            for node_id in only or self.member_ids:
                node = self.nodes[node_id]
                if node.replica is not None:
                    node.replica.tick()
                    self.drive(node)
            self.deliver_all()
            # Within a tick every written Ready also gets its fsync; until then a crash may lose it.
            # So does every staged snapshot get installed (the fault-free path).
            while any(node.pending is not None or (node.staged is not None and node.replica is not None)
                      for node in self.nodes.values()):
                for node in self.nodes.values():
                    self.finish_pending(node)
                    if node.staged is not None and node.replica is not None:
                        self.finish_install(node, faults=False)
                self.deliver_all()

    def run_until(self, predicate: Callable[[], bool], max_ticks: int, what: str) -> int:
        for elapsed in range(max_ticks + 1):
            if predicate():
                return elapsed
            self.run_ticks(1)
        self.fail(f"not reached within {max_ticks} ticks: {what}")
        raise AssertionError  # unreachable: fail raises

    def the_primary(self) -> str | None:
        """The one live primary of the highest view, if every live node agrees on it."""
        primaries = [node for node in self.live_primaries()]
        if not primaries:
            return None
        best = max(primaries, key=lambda node: node.replica.view)  # type: ignore[union-attr]
        return best.node_id

    def elect(self, node_id: str, max_ticks: int = 100) -> None:
        """Let only node_id's election timer run until it leads, with everyone else reachable."""
        replica = self.replica(node_id)
        for _ in range(max_ticks):
            if replica.role is Role.PRIMARY and replica.commit_index >= replica.last_index:
                return
            self.run_ticks(1, only=(node_id,))
            replica = self.replica(node_id)
        self.fail(f"{node_id} did not become a primary with a committed no-op")

    def isolate(self, *groups: tuple[str, ...]) -> None:
        """Partition the cluster: each group can talk only within itself."""
        self.partition_of = {}
        for number, group in enumerate(groups):
            for node_id in group:
                self.partition_of[node_id] = number
        for node_id in self.member_ids:
            self.partition_of.setdefault(node_id, len(groups))
        self.note(f"partition {groups}")

    def propose_at(self, node_id: str, payload: bytes) -> tuple[int, int]:
        self.record_write_invoked(payload)
        index, view = self.replica(node_id).propose(payload)
        self.drive(self.nodes[node_id])
        return index, view

    def applied_payloads(self, node_id: str) -> set[bytes]:
        """Payloads of acknowledged entries this node has applied (by index, checked by the digest chain)."""
        applied = self.nodes[node_id].disk.applied_index
        return {payload for index, (_, payload) in self.committed.items() if index <= applied}
