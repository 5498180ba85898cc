"""A seeded, deterministic simulation of a protocol.Replica cluster.

Everything that can go wrong between replicas is drawn from one
``random.Random(seed)``: message delay, loss, duplication and reordering,
partitions that form and heal, crashes (with a disk on which writes not yet
fsynced vanish, or survive only as a prefix) and restarts. The simulated driver
follows the node's order for every Ready: reset the log base after a snapshot,
persist (staging snapshot chunks), send, apply, advance. A snapshot's bytes never
pass through the core: the primary's driver keeps its image and reads chunks
from it, the backup's driver stages them and installs the whole image later (a
step of its own, so crashes land inside the install: after the store swap and
before the log reset). After every step the invariants of docs/replication.md are
checked (invariants.py); a violation raises SimulationFailure naming the seed
and the recent trace, and ``pytest tests/sim --seed N`` replays exactly that
run. The nemeses beyond loss, delay and partitions live in nemeses.py.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import random
import zlib
from collections import deque
from dataclasses import dataclass, field, replace

from protocol import (INITIAL_HARD_STATE, BackupLostEntries, BecamePrimary, MemberBelowFloor, Entry, EntryKind, HardState,
                      InstallSnapshot, Membership, Message, NotPrimary, ProposalRejected, Ready, ReplicaConfig,
                      Replica, RestoredState, Role, decode_body)
from protocol.codec import encode_body
from protocol.replicated_log import ENTRY_OVERHEAD_BYTES
from protocol.messages import VoteReply
from client_history import ClientHistory
from invariants import InvariantChecks
from membership import MembershipChanges
from nemeses import Nemeses
# The node's own choices, so that the sweep checks the order tokenvault/core/node.py really uses.

TRACE_LENGTH = 60
MESSAGES_PER_TICK_LIMIT = 20_000
CLOCK_RATES = (0.5, 0.75, 1.0, 1.0, 1.5, 2.0)
# Where a crash may land inside one Ready, in the driver's order (see Ready in protocol/records.py).
# "after-write" and "after-durable-apply" stop before the fsync, so the write may survive only in part.
CRASH_POINTS = ("after-early-sends", "after-durable-apply", "after-fsync", "after-replies", "after-apply")
# Bugs that can be planted in the simulated driver (the mutant table): the replies that wait for
# the fsync leave before it; a restarted node forgets the vote it had persisted.
DRIVER_BUGS = frozenset({"replies_before_fsync", "forgets_vote_on_restart"})


class SimulationFailure(AssertionError):
    """An invariant broke. The message names the seed and the recent history."""


@dataclass(frozen=True, slots=True)
class SimulationConfig:
    """The shape of one simulated run; ``from_seed`` draws a varied one per seed."""

    cluster_size: int = 3
    steps: int = 2000
    election_timeout_ticks: int = 10
    heartbeat_interval_ticks: int = 2
    max_entries_per_message: int = 64
    max_bytes_per_message: int = 4096
    max_inflight_appends: int = 8
    loss_probability: float = 0.02
    duplicate_probability: float = 0.02
    max_delay_ticks: int = 2
    crash_weight: float = 1.0
    partition_weight: float = 1.0
    split_ready_probability: float = 0.2
    compact_weight: float = 1.5
    through_codec: bool = False
    check_quorum: bool = True
    # After healing, a new entry must commit everywhere within this many ticks plus the catch-up the
    # lag needs at the configured pace (Simulation.catch_up_ticks).
    liveness_bound_ticks: int = 400
    # The nemeses of issue 12. The defaults switch them off, so hand-built scenarios
    # get a plain network unless they ask; from_seed draws them for the sweep.
    link_fault_weight: float = 0.0  # one-way cuts, bridges, the primary isolated in a minority
    slow_link_weight: float = 0.0  # links whose delay exceeds an election timeout
    pause_weight: float = 0.0  # a node's ticks and message handling stop, then resume
    clock_skew: bool = False  # each node ticks at its own rate
    crash_point_probability: float = 0.0  # a crash between two steps of a Ready
    store_sync_probability: float = 1.0  # below 1: the store's applied tail may be unsynced and lost
    beyond_budget: bool = False  # more faults than the cluster tolerates: liveness is not required
    membership_weight: float = 0.0  # the primary adds, promotes or removes a member (membership.py)

    @classmethod
    def from_seed(cls, seed: int, steps: int = 2000) -> SimulationConfig:
        rng = random.Random(f"config-{seed}")
        return cls(
            cluster_size=rng.choices((1, 3, 5), weights=(1, 6, 3))[0],
            steps=steps,
            max_entries_per_message=rng.choice((1, 2, 4, 64)),
            max_bytes_per_message=rng.choice((48, 256, 4096)),
            max_inflight_appends=rng.choice((1, 2, 8)),
            loss_probability=rng.choice((0.0, 0.02, 0.1, 0.25)),
            duplicate_probability=rng.choice((0.0, 0.02, 0.1)),
            max_delay_ticks=rng.choice((0, 1, 3)),
            crash_weight=rng.choice((0.5, 1.0, 2.0)),
            partition_weight=rng.choice((0.5, 1.0, 2.0)),
            split_ready_probability=rng.choice((0.0, 0.2, 0.5)),
            through_codec=rng.random() < 0.25,
            check_quorum=rng.random() < 0.7,
            link_fault_weight=rng.choice((0.0, 0.5, 1.0)),
            slow_link_weight=rng.choice((0.0, 0.2, 0.5)),
            pause_weight=rng.choice((0.0, 0.2, 0.5)),
            clock_skew=rng.random() < 0.4,
            crash_point_probability=rng.choice((0.0, 0.005, 0.02)),
            store_sync_probability=rng.choice((1.0, 0.5, 0.1)),
            beyond_budget=rng.random() < 0.15,
            # Drawn last, so that the other settings of a seed stay what they were before changes existed.
            membership_weight=rng.choice((0.0, 0.0, 1.0, 2.0)),
        )


@dataclass
class Disk:
    """What survives a crash: the WAL (hard state, base, entries) and the store (applied state)."""

    hard_state: HardState = INITIAL_HARD_STATE
    base_index: int = 0
    base_view: int = 0
    entries: list[Entry] = field(default_factory=list)
    applied_index: int = 0
    applied_view: int = 0
    applied_digest: bytes = b"\x00" * 16
    # What of the applied state survives a crash: (index, view, digest) of the store's last sync.
    store_synced: tuple[int, int, bytes] = (0, 0, b"\x00" * 16)
    # The configuration the store recorded (the last CONFIG entry it applied; None: none yet), and as synced.
    applied_membership: Membership | None = None
    synced_membership: Membership | None = None
    # The members' floors (Replica.floors) as of the last fsync: the node keeps them durably too.
    floors: tuple[tuple[str, int], ...] = ()

    @property
    def last_index(self) -> int:
        return self.base_index + len(self.entries)


@dataclass
class SimNode:
    node_id: str
    replica: Replica | None
    disk: Disk = field(default_factory=Disk)
    pending: Ready | None = None  # written but not yet fsynced: lost (or torn) by a crash
    # Records of Readies that needed no fsync (a commit index alone): in the WAL's buffer until the
    # next fsync writes them ahead of its own, lost by a crash before it.
    unsynced: list = field(default_factory=list)
    pending_primary_view: int | None = None  # the view it led when that Ready was taken, if primary
    # Replica.floors as taken just before the pending Ready: kept on disk once it is durable, as the node
    # does (so a restored floor's view is one on disk).
    pending_floors: tuple = ()
    read_ids: int = 0
    # Primary: the snapshot image offered to each peer, as (index, view, bytes).
    sources: dict = field(default_factory=dict)
    # Backup: chunks staged so far, and a whole image waiting to be installed, as (index, view, bytes).
    staging: bytearray = field(default_factory=bytearray)
    staged: tuple | None = None
    # Clock skew: ticks this node performs per simulated tick, and the fraction carried over.
    tick_rate: float = 1.0
    tick_credit: float = 0.0
    # A paused process: until this tick it neither ticks nor handles messages (they wait in held).
    paused_until_ticks: int = 0
    held: list = field(default_factory=list)
    # A node that joined: the (voters, learners) its static config names; None: the first cluster's members.
    bootstrap: tuple | None = None
    # Replicas started on this node so far: each numbers its polls from its own base (RestoredState.first_poll).
    starts: int = 0


def digest_after(digest: bytes, entry: Entry) -> bytes:
    hasher = hashlib.blake2b(digest, digest_size=16)
    hasher.update(b"%d/%d/%d/" % (entry.index, entry.view, entry.kind))
    hasher.update(entry.payload)
    return hasher.digest()


class Simulation(InvariantChecks, Nemeses, MembershipChanges, ClientHistory):
    """One seeded run. ``run()`` performs the steps, then heals everything and checks liveness."""

    def __init__(self, seed: int, config: SimulationConfig | None = None,
                 replica_class: type[Replica] = Replica, driver_bugs: frozenset[str] = frozenset()) -> None:
        self.seed = seed
        self.config = config or SimulationConfig.from_seed(seed)
        self.replica_class = replica_class
        # Planted driver bugs, for the mutant table only: see DRIVER_BUGS.
        unknown = set(driver_bugs) - DRIVER_BUGS
        if unknown:
            raise ValueError(f"unknown driver bugs: {sorted(unknown)}")
        self.driver_bugs = driver_bugs
        self.rng = random.Random(seed)
        self.member_ids = tuple(f"n{number}" for number in range(1, self.config.cluster_size + 1))
        self.initial_ids = self.member_ids  # the static config of the first nodes (never updated)
        # Membership changes (membership.py): the newest committed configuration, and nodes stopped for good.
        self.committed_membership = Membership.of(self.member_ids)
        self.committed_membership_index = 0
        self.retired: set[str] = set()
        self.retiring: set[str] = set()
        self.membership_changes = 0
        self.replacements = 0  # replacements completed on the healed cluster (membership.replace_a_member)
        # index -> the voter sets its primary may have counted it with (membership.counted_voter_sets)
        self.acknowledged_voters: dict[int, tuple[tuple[str, ...], ...]] = {}
        self.nodes = {node_id: SimNode(node_id, None) for node_id in self.member_ids}
        for node in self.nodes.values():
            node.replica = self._start_replica(node)
        if self.config.clock_skew:
            for node in self.nodes.values():
                node.tick_rate = self.rng.choice(CLOCK_RATES)
        # Directed links that drop everything (one-way cuts, bridges, isolations), and links
        # whose messages take longer than an election timeout, with their extra delay.
        self.blocked: set[tuple[str, str]] = set()
        self.slow_links: dict[tuple[str, str], int] = {}
        self.isolated_until_ticks = 0  # the primary's isolation holds off heal() until then
        self.isolated_nodes: set[str] = set()
        self.isolation_armed = False  # an isolation drawn while no primary served: done at the next one
        self.crash_points_enabled = True
        self.fault_tolerance = (self.config.cluster_size - 1) // 2
        # Bookkeeping of the on-disk invariants.
        self.votes_granted: dict[tuple[str, int], str] = {}  # (voter, view) -> the candidate it granted
        self.entries_on_disk: dict[tuple[int, int], tuple[bytes, int]] = {}  # (index, view) -> (payload, prev view)
        self.acknowledged_indexes: list[int] = []  # sorted
        self.acknowledged_settled = 0  # acknowledged_indexes[:this] are held by a majority's stores for good
        self.superseded_reads = 0  # reads asked on a primary while a later view existed
        self.superseded_writes = 0
        self.crash_points_hit = 0
        self.store_tails_lost = 0
        self.pauses = 0
        self.link_faults = 0
        self.now_ticks = 0
        self.sequence = 0
        self.delayed: list[tuple[int, int, str, str, Message]] = []
        self.deliverable: list[tuple[str, str, Message]] = []
        self.partition_of: dict[str, int] = {node_id: 0 for node_id in self.member_ids}
        self.loss_probability = self.config.loss_probability
        self.duplicate_probability = self.config.duplicate_probability
        self.max_delay_ticks = self.config.max_delay_ticks
        self.trace: deque[str] = deque(maxlen=TRACE_LENGTH)
        self.step_number = 0
        # Invariant bookkeeping.
        self.primary_of_view: dict[int, str] = {}
        self.committed: dict[int, tuple[int, bytes]] = {}
        self.digest_at: dict[int, bytes] = {0: b"\x00" * 16}
        # index -> (entry view, payload, view of the primary that committed and acknowledged it)
        self.acknowledged: dict[int, tuple[int, bytes, int]] = {}
        self.checked_primaries: set[tuple[str, int]] = set()
        self.highest_acknowledged_index = 0
        # (node, request id) -> (highest acknowledged index when the read was asked, asked on a backup)
        self.read_floor: dict[tuple[str, int], tuple[int, bool]] = {}
        self.backup_reads_confirmed = 0
        self.payload_counter = 0
        self.reads_confirmed = 0
        self.snapshots_installed = 0
        self.elections = 0
        # The client history, checked for linearizability at the end of the steps (client_history.py).
        self._init_history()
        # Off only in the test showing that the history check alone catches a stale read.
        self.check_reads_in_real_time = True

    # ------------------------------------------------------------------ life cycle

    def _replica_config(self, node_id: str) -> ReplicaConfig:
        config = self.config
        bootstrap = self.bootstrap_membership(self.nodes[node_id])
        return ReplicaConfig(
            node_id=node_id, members=bootstrap.voters, learners=bootstrap.learners,
            election_timeout_ticks=config.election_timeout_ticks,
            heartbeat_interval_ticks=config.heartbeat_interval_ticks,
            max_entries_per_message=config.max_entries_per_message,
            max_bytes_per_message=config.max_bytes_per_message, max_inflight_appends=config.max_inflight_appends,
            snapshot_chunk_bytes=config.max_bytes_per_message,
            max_pending_reads=64, max_uncommitted_entries=512, check_quorum=config.check_quorum)

    def _start_replica(self, node: SimNode) -> Replica:
        disk = node.disk
        # As the node does: the store may be ahead of the WAL base; start the log after it.
        base_index, base_view = disk.base_index, disk.base_view
        if disk.applied_index > base_index:
            base_index, base_view = disk.applied_index, disk.applied_view
            held = disk.entries[base_index - disk.base_index - 1].view if base_index <= disk.last_index else None
            if held != base_view:
                # A crash between a snapshot's store swap and the log reset: the log does
                # not extend the store's position, so it is reset to it (as the node does).
                disk.base_index, disk.base_view, disk.entries = base_index, base_view, []
        entries = tuple(entry for entry in disk.entries if entry.index > base_index)
        hard_state = disk.hard_state
        if "forgets_vote_on_restart" in self.driver_bugs:
            hard_state = replace(hard_state, voted_for=None)
        if hard_state.commit_index < base_index:
            hard_state = replace(hard_state, commit_index=base_index)
        node.starts += 1
        restored = RestoredState(hard_state, base_index, base_view, entries, disk.applied_membership, disk.floors,
                                 first_poll=node.starts << 32)
        return self.replica_class(self._replica_config(node.node_id), restored, random.Random(self.rng.random()))

    def fail(self, message: str) -> None:
        history = "\n  ".join(self.trace)
        raise SimulationFailure(
            f"seed {self.seed} step {self.step_number}: {message}\n"
            f"replay with: pytest tests/sim --seed {self.seed}\nconfig: {self.config}\nrecent steps:\n  {history}")

    def note(self, text: str) -> None:
        self.trace.append(f"[{self.step_number} t={self.now_ticks}] {text}")

    # ------------------------------------------------------------------ the driver

    def drive(self, node: SimNode) -> None:
        """Carry out Readies in the node's order; sometimes stop after the write, before the fsync,
        and sometimes crash between two of its steps."""
        replica = node.replica
        while replica is not None and node.pending is None and replica.has_ready():
            primary_view = replica.view if replica.role is Role.PRIMARY else None
            floors = replica.floors
            ready = replica.ready()
            crash_point = self._draw_crash_point(node)
            if not self._before_fsync(node, ready, primary_view, crash_point):
                return
            if self.config.split_ready_probability and self.rng.random() < self.config.split_ready_probability:
                node.pending, node.pending_primary_view, node.pending_floors = ready, primary_view, floors
                return
            if not self.complete(node, ready, primary_view, floors, crash_point):
                return
            replica = node.replica

    def _draw_crash_point(self, node: SimNode) -> str | None:
        probability = self.config.crash_point_probability
        if not (probability and self.crash_points_enabled and self.rng.random() < probability
                and self._may_take_down(node)):
            return None
        return self.rng.choice(CRASH_POINTS)

    def _crash_at(self, node: SimNode, point: str, ready: Ready | None = None) -> None:
        self.crash_points_hit += 1
        self.note(f"{node.node_id} crashes {point}")
        if ready is not None:
            node.pending, node.pending_primary_view = ready, None  # written, the fsync never finished
        self.crash(node)

    def _before_fsync(self, node: SimNode, ready: Ready, primary_view: int | None,
                      crash_point: str | None = None) -> bool:
        """What tokenvault/core/node.py does while a Ready's write is still running; False if it crashed.

        The primary's own appends, heartbeats and snapshot chunks leave at once,
        and committed entries that an earlier Ready already made durable are
        applied (and answered); a crash before the fsync keeps both effects.
        """
        for destination, message in ready.messages:
            self.send(node.node_id, destination, message)
        if "replies_before_fsync" in self.driver_bugs:
            for destination, message in ready.messages_after_persist:
                self.send(node.node_id, destination, message)
        for read in ready.snapshot_reads:
            self._send_snapshot_chunk(node, read)
        if crash_point == "after-early-sends":
            self._crash_at(node, crash_point, ready)
            return False
        self._apply(node, ready.committed_durable, primary_view)
        if crash_point == "after-durable-apply":
            self._crash_at(node, crash_point, ready)
            return False
        return True

    def _send_snapshot_chunk(self, node: SimNode, read) -> None:
        source = node.sources.get(read.peer)
        if source is None or source[:2] != (read.index, read.snapshot_view) or len(source[2]) != read.total_bytes:
            return  # the image was dropped (a restart): the transfer stalls and is asked for again
        data = source[2][read.offset:read.offset + read.length]
        self.send(node.node_id, read.peer, InstallSnapshot(read.view, read.index, read.snapshot_view, read.offset,
                                                           read.total_bytes, data, zlib.crc32(data), read.offer))

    def _stage_snapshot_chunks(self, node: SimNode, ready: Ready) -> None:
        for chunk in ready.snapshot_chunks:
            if chunk.offset == 0:
                node.staging = bytearray()
                node.staged = None
            if chunk.offset != len(node.staging):
                self.fail(f"{node.node_id} stages a chunk at {chunk.offset} after {len(node.staging)} bytes")
            node.staging += chunk.data
            if chunk.complete:
                node.staged = (chunk.index, chunk.view, bytes(node.staging))
                node.staging = bytearray()

    def finish_install(self, node: SimNode, faults: bool = True) -> None:
        """The driver verified a whole staged image: swap the store, tell the core, then it resets the log."""
        assert node.replica is not None and node.staged is not None
        index, view, image = node.staged
        node.staged = None
        if node.disk.applied_index >= index:
            # As the node does: the store got there through the log meanwhile; no install.
            node.replica.snapshot_failed(index, view)
            self.drive(node)
            return
        if faults and self.rng.random() < 0.1:
            self.note(f"{node.node_id} refused staged snapshot {index}/{view}")
            node.replica.snapshot_failed(index, view)
            self.drive(node)
            return
        self._install_store(node, index, view, image)
        if faults and self.rng.random() < 0.15 and self._may_take_down(node):
            self.crash(node)  # between the store swap and the log reset
            return
        node.replica.snapshot_installed(index, view, node.disk.applied_membership)
        self.drive(node)

    def complete(self, node: SimNode, ready: Ready, primary_view: int | None, floors: tuple,
                 crash_point: str | None = None) -> bool:
        """The fsync finished: the other messages go, the rest is applied, then advance(). False if it crashed."""
        replica = node.replica
        assert replica is not None
        if ready.must_sync:
            self._persist(node, ready, len(node.unsynced) + len(self._records(ready)))
            node.disk.floors = floors
        else:
            node.unsynced.extend(self._records(ready))
        self._stage_snapshot_chunks(node, ready)
        if crash_point == "after-fsync":
            self._crash_at(node, crash_point)
            return False
        if "replies_before_fsync" not in self.driver_bugs:
            for destination, message in ready.messages_after_persist:
                self.send(node.node_id, destination, message)
        if crash_point == "after-replies":
            self._crash_at(node, crash_point)
            return False
        self._apply(node, ready.committed_after_persist, primary_view)
        if crash_point == "after-apply":
            self._crash_at(node, crash_point)
            return False
        for result in ready.read_results:
            self._check_read(node, result)
        for peer, _ in ready.snapshot_transfers_ended:
            node.sources.pop(peer, None)
        for peer in ready.snapshot_requests:
            disk = node.disk
            image = self._snapshot_bytes(node)
            if replica.offer_snapshot(peer, disk.applied_index, disk.applied_view, len(image)):
                node.sources[peer] = (disk.applied_index, disk.applied_view, image)
        if replica.role is not Role.PRIMARY:
            node.sources.clear()
        for event in ready.events:
            if isinstance(event, BecamePrimary):
                self.elections += 1
                self.note(f"{node.node_id} became primary of view {event.view}")
            elif isinstance(event, BackupLostEntries):
                # Disks here lose only what was never fsynced, and nothing is acknowledged before its
                # fsync: a backup refusing what it acknowledged is a false alarm of the detection.
                self.fail(f"{node.node_id} says {event.peer} lost entries it acknowledged: {event}")
            elif isinstance(event, MemberBelowFloor):
                # Likewise: no member's log can end below what it acknowledged of the committed log.
                self.fail(f"{node.node_id} says {event.member}'s log ends below its floor: {event}")
        replica.advance(ready)
        return True

    @staticmethod
    def _records(ready: Ready) -> list[tuple[str, object]]:
        records: list[tuple[str, object]] = []
        if ready.snapshot is not None:
            records.append(("snapshot", ready.snapshot))
        if ready.truncate_from is not None:
            records.append(("truncate", ready.truncate_from))
        records.extend(("entry", entry) for entry in ready.entries)
        if ready.hard_state is not None:
            records.append(("hard_state", ready.hard_state))
        return records

    def _persist(self, node: SimNode, ready: Ready, record_count: int) -> None:
        """Make the first record_count records durable, in the WAL's order: those still buffered by
        Readies that needed no fsync, then this Ready's."""
        disk = node.disk
        records = node.unsynced + self._records(ready)
        node.unsynced = []
        for kind, value in records[:record_count]:
            if kind == "snapshot":
                self._reset_log_base(node, value)  # type: ignore[arg-type]
            elif kind == "truncate":
                cut = value - disk.base_index - 1  # type: ignore[operator]
                if cut < 0:
                    self.fail(f"{node.node_id} asked to truncate below its log base at {value}")
                if value <= disk.applied_index:  # type: ignore[operator]
                    self.fail(f"{node.node_id} truncates applied entry {value}")
                del disk.entries[cut:]
            elif kind == "entry":
                if value.index != disk.last_index + 1:  # type: ignore[union-attr]
                    self.fail(f"{node.node_id} Ready entry {value} does not extend its disk log at {disk.last_index}")
                self._check_log_matching(node, value)  # type: ignore[arg-type]
                disk.entries.append(value)  # type: ignore[arg-type]
            else:
                previous = disk.hard_state
                if value.view < previous.view:  # type: ignore[union-attr]
                    self.fail(f"{node.node_id} hard state view went back from {previous.view}")
                if (value.view == previous.view and previous.voted_for is not None  # type: ignore[union-attr]
                        and value.voted_for != previous.voted_for):  # type: ignore[union-attr]
                    self.fail(f"{node.node_id} durable vote in view {previous.view} changed from "
                              f"{previous.voted_for} to {value.voted_for}")  # type: ignore[union-attr]
                disk.hard_state = value  # type: ignore[assignment]
        if ready.truncate_from is not None and record_count:
            self._check_acknowledged_durable()

    def _install_store(self, node: SimNode, index: int, view: int, image: bytes) -> None:
        """The store swap: atomic on its own, and durable before the core hears of it."""
        disk = node.disk
        header_index = int.from_bytes(image[0:8], "big")
        header_view = int.from_bytes(image[8:16], "big")
        digest = image[16:32]
        if (header_index, header_view) != (index, view):
            self.fail(f"{node.node_id} snapshot header {header_index}/{header_view} != {index}/{view}")
        if self.digest_at.get(index) != digest:
            self.fail(f"{node.node_id} installs a snapshot at {index} whose state differs from the committed one")
        if index < disk.applied_index:
            self.fail(f"{node.node_id} installs a snapshot at {index} behind its applied {disk.applied_index}")
        disk.applied_index, disk.applied_view, disk.applied_digest = index, view, digest
        length = int.from_bytes(image[32:34], "big")
        disk.applied_membership = Membership.decode(image[34:34 + length]) if length else None
        disk.store_synced, disk.synced_membership = (index, view, digest), disk.applied_membership
        self.snapshots_installed += 1
        self.note(f"{node.node_id} installed snapshot {index}/{view} into its store")

    def _reset_log_base(self, node: SimNode, snapshot) -> None:
        disk = node.disk
        if (disk.applied_index, disk.applied_view) < (snapshot.index, snapshot.view):
            self.fail(f"{node.node_id} resets its log to {snapshot.index} before its store holds the snapshot")
        disk.base_index, disk.base_view, disk.entries = snapshot.index, snapshot.view, []

    def _snapshot_bytes(self, node: SimNode) -> bytes:
        disk = node.disk
        padding = bytes(self.rng.randrange(0, 300))  # exercises multi-chunk transfers
        membership = disk.applied_membership.encode() if disk.applied_membership is not None else b""
        return (disk.applied_index.to_bytes(8, "big") + disk.applied_view.to_bytes(8, "big")
                + disk.applied_digest + len(membership).to_bytes(2, "big") + membership + padding)

    def _apply(self, node: SimNode, committed: tuple[Entry, ...], primary_view: int | None) -> None:
        disk = node.disk
        for entry in committed:
            known = self.committed.get(entry.index)
            if known is None:
                self.committed[entry.index] = (entry.view, entry.payload)
            elif known != (entry.view, entry.payload):
                self.fail(f"{node.node_id} commits {entry.index}/{entry.view} but {known[0]} was committed there")
            if entry.index <= disk.applied_index:
                continue  # the store skips what it already applied (restart replay)
            if entry.index != disk.applied_index + 1:
                self.fail(f"{node.node_id} applies {entry.index} after {disk.applied_index}: a gap")
            disk.applied_digest = digest_after(disk.applied_digest, entry)
            disk.applied_index, disk.applied_view = entry.index, entry.view
            if entry.kind is EntryKind.CONFIG:
                disk.applied_membership = Membership.decode(entry.payload)
                self.note_committed_config(entry)
            if self.config.store_sync_probability >= 1 or self.rng.random() < self.config.store_sync_probability:
                disk.store_synced = (disk.applied_index, disk.applied_view, disk.applied_digest)
                disk.synced_membership = disk.applied_membership
            expected = self.digest_at.setdefault(entry.index, disk.applied_digest)
            if expected != disk.applied_digest:
                self.fail(f"{node.node_id} state at applied index {entry.index} differs from another replica's")
            if primary_view is not None and entry.kind is EntryKind.COMMAND:
                # The driver answers the client here; the entry was committed in primary_view.
                if entry.index not in self.acknowledged:
                    position = bisect.bisect(self.acknowledged_indexes, entry.index)
                    self.acknowledged_indexes.insert(position, entry.index)
                    self.acknowledged_settled = min(self.acknowledged_settled, position)
                self.acknowledged[entry.index] = (entry.view, entry.payload, primary_view)
                self.record_write_acknowledged(entry.payload)
                if node.replica is not None:
                    self.acknowledged_voters.setdefault(entry.index, self.counted_voter_sets(node.replica, entry.index))
                self.highest_acknowledged_index = max(self.highest_acknowledged_index, entry.index)
        if primary_view is not None and committed:
            last = committed[-1]
            self._check_no_electable_node_lacks(last.index, last.view)

    # ------------------------------------------------------------------ network

    def send(self, source: str, destination: str, message: Message) -> None:
        if isinstance(message, VoteReply) and message.granted:
            self._check_vote(source, destination, message.view)
        if self.config.through_codec:
            message = decode_body(encode_body(message))
        rng = self.rng
        if self.loss_probability and rng.random() < self.loss_probability:
            return
        copies = 2 if self.duplicate_probability and rng.random() < self.duplicate_probability else 1
        for _ in range(copies):
            delay = rng.randint(0, self.max_delay_ticks) if self.max_delay_ticks else 0
            delay += self.slow_links.get((source, destination), 0)
            if delay == 0:
                self.deliverable.append((source, destination, message))
            else:
                self.sequence += 1
                heapq.heappush(self.delayed, (self.now_ticks + delay, self.sequence, source, destination, message))

    def deliver_one(self) -> bool:
        if not self.deliverable:
            return False
        position = self.rng.randrange(len(self.deliverable))
        self.deliverable[position], self.deliverable[-1] = self.deliverable[-1], self.deliverable[position]
        source, destination, message = self.deliverable.pop()
        node = self.nodes[destination]
        if node.replica is None or not self.link_open(source, destination):
            return True
        if self.is_paused(node):
            node.held.append((source, destination, message))  # handled when the process resumes
            return True
        node.replica.step(source, message)
        self.drive(node)
        return True

    def link_open(self, source: str, destination: str) -> bool:
        return (self.partition_of.get(source, 0) == self.partition_of.get(destination, 0)
                and (source, destination) not in self.blocked)

    def is_paused(self, node: SimNode) -> bool:
        return node.paused_until_ticks > self.now_ticks

    def tick(self) -> None:
        self.now_ticks += 1
        while self.delayed and self.delayed[0][0] <= self.now_ticks:
            _, _, source, destination, message = heapq.heappop(self.delayed)
            self.deliverable.append((source, destination, message))
        for node in self.nodes.values():
            if node.held and not self.is_paused(node):
                self.note(f"{node.node_id} resumes with {len(node.held)} held message(s)")
                self.deliverable.extend(node.held)
                node.held.clear()
            if node.replica is None or self.is_paused(node):
                continue
            # Clock skew: a fast node ticks twice in some simulated ticks, a slow one skips some.
            node.tick_credit += node.tick_rate
            while node.tick_credit >= 1 and node.replica is not None:
                node.tick_credit -= 1
                node.replica.tick()
                self.drive(node)

    # ------------------------------------------------------------------ client and faults

    def live_primaries(self) -> list[SimNode]:
        """Every running node that believes it is primary (a superseded one included)."""
        return [node for node in self.nodes.values()
                if node.replica is not None and node.replica.role is Role.PRIMARY and not self.is_paused(node)]

    def propose(self, node: SimNode | None = None) -> bool:
        candidates = [node] if node is not None else self.live_primaries()
        if not candidates:
            return False
        node = self.rng.choice(candidates)
        self.superseded_writes += self._superseded(node)
        self.payload_counter += 1
        payload = b"c%d" % self.payload_counter + bytes(self.rng.randrange(0, 40))
        self.record_write_invoked(payload)
        try:
            index, view = node.replica.propose(payload)  # type: ignore[union-attr]
        except (NotPrimary, ProposalRejected):
            del self.history_writes[payload]  # refused: it never takes effect
            return False
        self.note(f"{node.node_id} proposed {index}/{view}")
        self.drive(node)
        return True

    def request_read(self) -> None:
        """A read on a primary, or on a backup that asks its primary for a read index (ReadIndex)."""
        readers = [node for node in self.nodes.values() if node.replica is not None and not self.is_paused(node) and (
            node.replica.role is Role.PRIMARY
            or (node.replica.role is Role.BACKUP and node.replica.primary_id is not None))]
        primaries = [node for node in readers if node.replica.role is Role.PRIMARY]  # type: ignore[union-attr]
        if (len(primaries) > 1 or self.now_ticks < self.isolated_until_ticks) and self.rng.random() < 0.7:
            # The client asks every node that believes it leads, a superseded or isolated one above
            # all: that is where a read without its quorum round comes back stale.
            readers = primaries
        if not readers:
            return
        node = self.rng.choice(readers)
        if node.replica.role is Role.PRIMARY and self._superseded(node):  # type: ignore[union-attr]
            self.superseded_reads += 1
        self.ask_read(node)

    def ask_read(self, node: SimNode) -> int | None:
        """A client read on this node; its answer must see every write acknowledged before now.
        Returns the request id, or None when the node refuses (NotPrimary)."""
        assert node.replica is not None
        node.read_ids += 1
        self.read_floor[(node.node_id, node.read_ids)] = (self.highest_acknowledged_index,
                                                         node.replica.role is Role.BACKUP)
        self.record_read_invoked(node.node_id, node.read_ids)
        try:
            node.replica.request_read(node.read_ids)
        except NotPrimary:
            del self.read_floor[(node.node_id, node.read_ids)]
            self.record_read_dropped(node.node_id, node.read_ids)
            return None
        self.drive(node)
        return node.read_ids

    def down_nodes(self) -> list[SimNode]:
        """Crashed nodes that may be started again (a retired one never is)."""
        return [node for node in self.nodes.values() if node.replica is None and node.node_id not in self.retired]

    def crash(self, node: SimNode) -> None:
        if node.pending is not None:
            records = node.unsynced + self._records(node.pending)
            # The fsync never finished: any prefix of the write may or may not be on disk.
            kept = self.rng.randrange(len(records) + 1)
            self._persist(node, node.pending, kept)
            node.pending = None
        node.unsynced = []  # still in the WAL's buffer, never written
        disk = node.disk
        if disk.store_synced[0] < disk.applied_index:
            # The store's applied tail was never synced: it is lost; the WAL replays it.
            disk.applied_index, disk.applied_view, disk.applied_digest = disk.store_synced
            disk.applied_membership = disk.synced_membership
            self.store_tails_lost += 1
        node.replica = None
        node.sources.clear()
        node.staging, node.staged = bytearray(), None  # staging is not kept across a restart
        node.held.clear()  # a crashed process loses what it had not handled
        node.paused_until_ticks = 0
        self.note(f"{node.node_id} crashed")

    def restart(self, node: SimNode) -> None:
        assert node.node_id not in self.retired, "a retired node is never started again"
        node.replica = self._start_replica(node)
        self.note(f"{node.node_id} restarted (view {node.replica.view}, last {node.replica.last_index})")
        self.drive(node)

    def finish_pending(self, node: SimNode) -> None:
        if node.pending is not None and node.replica is not None and not self.is_paused(node):
            ready, primary_view = node.pending, node.pending_primary_view
            node.pending = node.pending_primary_view = None
            self.complete(node, ready, primary_view, node.pending_floors)
            self.drive(node)

    def partition(self) -> None:
        if self.now_ticks < self.isolated_until_ticks:
            return  # the primary's isolation runs its full course
        groups = {node_id: self.rng.randrange(2) for node_id in self.member_ids}
        self.partition_of = groups
        self.note(f"partition {sorted(groups.items())}")

    def heal(self, force: bool = False) -> None:
        if not force and self.now_ticks < self.isolated_until_ticks:
            return  # the primary's isolation runs its full course
        self.partition_of = {node_id: 0 for node_id in self.member_ids}
        self.blocked.clear()
        self.slow_links.clear()
        self.isolated_until_ticks = 0
        self.note("healed")

    def compact(self, node: SimNode) -> None:
        replica, disk = node.replica, node.disk
        assert replica is not None
        # The log is truncated only below what the store has durably synced (DESIGN.md, storage).
        index = min(disk.applied_index - self.rng.randrange(0, 4), disk.store_synced[0])
        if index <= replica.log_base_index:
            return
        replica.compact(index)
        if disk.base_index < index <= disk.last_index:
            view = disk.entries[index - disk.base_index - 1].view
            del disk.entries[:index - disk.base_index]
            disk.base_index, disk.base_view = index, view
        self.note(f"{node.node_id} compacted to {index}")

    # ------------------------------------------------------------------ the run

    def step(self) -> None:
        self.step_number += 1
        self.retire_pending()
        rng = self.rng
        config = self.config
        # Membership changes take the roll's range above 100, so a run without them draws as before.
        roll = rng.random() * (100 + config.membership_weight)
        if self.now_ticks < self.isolated_until_ticks and rng.random() < 0.08:
            self.client_round()
        elif self.isolation_armed and any(self._serves_reads(node.replica) for node in self.live_primaries()):
            self.isolate_primary()
        if roll >= 100:
            self.change_membership()
        elif roll < 45:
            if not self.deliver_one():
                self.tick()
        elif roll < 65:
            self.tick()
        elif roll < 76:
            self.propose()
        elif roll < 80:
            self.request_read()
        elif roll < 88:
            busy = [node for node in self.nodes.values() if node.pending is not None and not self.is_paused(node)]
            installing = [node for node in self.nodes.values()
                          if node.staged is not None and node.replica and not self.is_paused(node)]
            if installing and rng.random() < 0.5:
                self.finish_install(rng.choice(installing))
            elif busy:
                self.finish_pending(rng.choice(busy))
        elif roll < 88 + config.compact_weight:
            live = [node for node in self.nodes.values() if node.replica is not None and not self.is_paused(node)]
            if live:
                self.compact(rng.choice(live))
        elif roll < 92 + config.crash_weight:
            live = [node for node in self.nodes.values() if node.replica is not None]
            if live and rng.random() < 0.5:
                # Half of the crashes hit a primary: failover is where the subtle cases live.
                primaries = self.live_primaries()
                victim = rng.choice(primaries if primaries and rng.random() < 0.5 else live)
                if self._may_take_down(victim):
                    self.crash(victim)
            else:
                down = self.down_nodes()
                if down:
                    self.restart(rng.choice(down))
        elif roll < 94 + config.crash_weight + config.partition_weight:
            if rng.random() < 0.45:
                self.partition()
            else:
                self.heal()
        elif roll < 94 + config.crash_weight + config.partition_weight + config.link_fault_weight:
            self.link_fault()
        elif roll < 94 + config.crash_weight + config.partition_weight + config.link_fault_weight \
                + config.slow_link_weight:
            self.slow_link()
        elif roll < 94 + config.crash_weight + config.partition_weight + config.link_fault_weight \
                + config.slow_link_weight + config.pause_weight:
            self.pause()
        else:
            down = self.down_nodes()
            if down:
                self.restart(rng.choice(down))
        self.check_step_invariants()

    def run(self) -> Simulation:
        for _ in range(self.config.steps):
            self.step()
        self.check_linearizable_history()
        self.check_liveness()
        return self

    def check_liveness(self) -> None:
        """Heal every fault; a primary must then be elected and commit a new entry on every replica.

        A run beyond the fault budget instead keeps more nodes down than the cluster
        tolerates: it may not make progress then, so liveness is not required of it,
        but every safety invariant is still checked while it runs on.
        """
        self.heal(force=True)
        self.crash_points_enabled = False
        self.loss_probability = self.duplicate_probability = 0.0
        self.max_delay_ticks = min(self.max_delay_ticks, 1)
        for node in self.nodes.values():
            node.paused_until_ticks = 0
            node.tick_rate = 1.0  # skew tests safety; timeouts assume one clock rate to be live
            if node.replica is None and node.node_id not in self.retired:
                self.restart(node)
            self.finish_pending(node)
        members = self.final_members()
        voters = [node for node in members if self.may_campaign(node)]
        if self.config.beyond_budget and len(voters) > 1:
            for node in self.rng.sample(voters, (len(voters) - 1) // 2 + 1):
                self.crash(node)
            self._run_on_unavailable()
            return
        self._commit_marker_everywhere()
        self._check_converged()
        if self.config.membership_weight:
            # On the healed cluster: a fresh node replaces a member, then a voter crashes (membership.py).
            crashed = self.replace_a_member()
            self._commit_marker_everywhere()  # with one voter down when it crashed one
            if crashed is not None:
                self.restart(crashed)
                self._commit_marker_everywhere()
            self._check_converged()

    def healed_tick(self) -> None:
        """One tick of the healed cluster: every message delivered, every write synced, every snapshot installed."""
        self.retire_pending()
        self.tick()
        for _ in range(MESSAGES_PER_TICK_LIMIT):
            if not self.deliver_one():
                break
        else:
            self.fail(f"more than {MESSAGES_PER_TICK_LIMIT} messages within one tick: a message storm")
        for node in self.nodes.values():
            self.finish_pending(node)
            if node.staged is not None and node.replica is not None:
                self.finish_install(node, faults=False)
        self.check_step_invariants()

    def catch_up_ticks(self) -> int:
        """Ticks the healed network needs, at the configured pace, to bring every member up to the
        longest log: the most entries any member lacks, at one message's worth of entries per round
        trip (a message holds max_entries_per_message entries of at most the largest payload here, and
        at least one). Pipelining (max_inflight_appends) is not counted on: the network reorders
        appends, and a backup refuses one past a gap, so the primary probes again (seed 404799: 309
        entries, one a message, one in flight, took 530 ticks; the bound is now 1,273)."""
        live = [node for node in self.nodes.values() if node.replica is not None]
        members = [node for node in self.final_members() if node.replica is not None]
        if not live or not members:
            return 0
        longest = max(live, key=lambda node: node.disk.base_index + len(node.disk.entries))
        lag = longest.disk.base_index + len(longest.disk.entries) - min(node.disk.applied_index for node in members)
        largest = max((len(entry.payload) for entry in longest.disk.entries), default=0) + ENTRY_OVERHEAD_BYTES
        per_message = max(1, min(self.config.max_entries_per_message, self.config.max_bytes_per_message // largest))
        round_trip = 2 * self.max_delay_ticks + 1  # an append's delay, its reply's, and the tick between
        return -(-max(0, lag) // per_message) * round_trip

    def _commit_marker_everywhere(self) -> None:
        marker: bytes | None = None
        marker_index = marker_view = 0
        bound = self.config.liveness_bound_ticks + self.catch_up_ticks()
        for _ in range(bound):
            self.healed_tick()
            primaries = self.live_primaries()
            if len(primaries) == 1 and (marker is None or primaries[0].replica.view != marker_view):
                # A new primary (or the first one after healing) gets a fresh entry to commit.
                try:
                    proposed = primaries[0].replica.propose(b"marker-%d" % (self.payload_counter + 1))  # type: ignore[union-attr]
                except ProposalRejected:
                    # Its uncommitted entries are at their bound (a primary that could not commit while
                    # the network was cut): they commit first, and the marker is asked for next tick.
                    self.drive(primaries[0])
                    continue
                self.payload_counter += 1
                marker = b"marker-%d" % self.payload_counter
                marker_index, marker_view = proposed
                self.drive(primaries[0])
            if (marker is not None and self.committed.get(marker_index) == (marker_view, marker)
                    and all(node.disk.applied_index >= marker_index for node in self.final_members()
                            if node.replica is not None)):
                break
        else:
            self.fail(f"no new entry committed on every replica within {bound} ticks after healing "
                      f"({self.config.liveness_bound_ticks}, and {bound - self.config.liveness_bound_ticks} to catch up)")

    def _run_on_unavailable(self) -> None:
        """Beyond the budget: no majority is up. Entries may still commit on copies the crashed
        nodes made durable before they went down, so the checks are the per-step ones (every
        acknowledged entry durable on a majority's disk, among others) and nothing acknowledged lost."""
        for _ in range(self.config.liveness_bound_ticks // 4):
            self.tick()
            for _ in range(MESSAGES_PER_TICK_LIMIT):
                if not self.deliver_one():
                    break
            for node in self.nodes.values():
                self.finish_pending(node)
            primaries = self.live_primaries()
            if primaries and self.rng.random() < 0.3:
                self.propose()
            self.check_step_invariants()
        for index, (view, payload, _) in self.acknowledged.items():
            if self.committed.get(index) != (view, payload):
                self.fail(f"acknowledged entry {index} was lost")

    def _check_converged(self) -> None:
        for node in self.final_members():
            disk = node.disk
            if self.digest_at.get(disk.applied_index) != disk.applied_digest:
                self.fail(f"{node.node_id} state at {disk.applied_index} differs from the committed one")
            if disk.applied_index < self.highest_acknowledged_index:
                self.fail(f"{node.node_id} has not applied acknowledged entries after healing")
        for index, (view, payload, _) in self.acknowledged.items():
            if self.committed.get(index) != (view, payload):
                self.fail(f"acknowledged entry {index} was lost")
