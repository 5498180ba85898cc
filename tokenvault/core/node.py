"""The node driver: one asyncio loop around the pure replication core.

Everything that touches the ``protocol.Replica`` happens in one driver task, so
the core is never re-entered while a ``Ready`` batch is being carried out. HTTP
handlers and the peer transport only put work into an inbox and wake the
driver. For every ``Ready`` the driver follows the order the core states in
``protocol.Ready`` (tokenvault/core/snapshot_transfer.py moves snapshot bytes):
``messages`` leave before the fsync, ``committed_durable`` is applied
before the fsync, ``messages_after_persist`` and ``committed_after_persist``
wait for it, then ``advance()``. The fsync runs on the loop, only when the
Ready says ``must_sync``; requests and messages that arrive meanwhile wait in
their sockets and go into the next batch (group commit).
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import math
import os
import random
import shutil
import ssl
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol import (INITIAL_HARD_STATE, BackupLostEntries, BecamePrimary, ElectionStarted, Entry, EntryKind, Event,
                      ForwardRequest, ForwardResponse, HardState, MemberBelowFloor, Membership, MembershipChanged, MembershipError,
                      Message, NotPrimary, PrimaryChanged, ProposalRejected, ReadResult, Ready, Replica,
                      ReplicaConfig, RestoredState, Role, SteppedDown)
from tokenvault.config import ConfigError, NodeConfig, split_host_port
from tokenvault.core import commands
from tokenvault.core.backup import BACKUP_WORK_DIR_NAME
from tokenvault.core.shred import ShredPass, ShredRecord, Shredder
from tokenvault.core.snapshot_transfer import SnapshotTransfers
from tokenvault.core.snapshots import PendingShred
from tokenvault.core.store import VaultStore
from tokenvault.core.store_files import STORE_DIRECTORY, PreparedInstall, replace_file
from tokenvault.core.store_layout import (AUDIT_KIND, AUDIT_TRIM_KIND, CREATE_KEY_KIND, DELETE_KIND, DESTROY_KIND,
                                          REVOKE_KEY_KIND, ROTATE_KIND, TOKENIZE_KIND, ApplyResult,
                                          Outcome, StoreCorruption, StoreDamaged, StoreError, reason)
from tokenvault.core.transport import PeerAddress, PeerTransport
from tokenvault.core.wal import RecoveredLog, WriteAheadLog
from tokenvault.core.wal_segments import WalCorruption
from tokenvault.crypto.keys import KeyRing, new_epoch_secret
from tokenvault.core.incarnations import MemberFloors, PeerIncarnations, load_or_create_incarnation, take_poll_base
from tokenvault.crypto.tls import NodeTls, PeerTlsContexts, TlsError, load_node_tls, reload_node_tls
from tokenvault.futures import await_future, cancel_and_wait
from tokenvault.logs import SummedEvent, get_logger
from tokenvault.metrics import Metrics

# Command kinds that never remove a mapping nor make one unreadable (see Node.removal_index; an audit
# trim removes audit records only). A tokenize may give an existing mapping a new life, never a shorter one.
ONLY_ADDING_KINDS = frozenset({TOKENIZE_KIND, ROTATE_KIND, CREATE_KEY_KIND, REVOKE_KEY_KIND, AUDIT_KIND,
                               AUDIT_TRIM_KIND})

log = get_logger("node")

INBOX_MAX_ITEMS = 100_000
MAX_FRAME_BYTES = 16 * 1024 * 1024
SHUTDOWN_GRACE_SECONDS = 1.0
# The primary logs token.issued at most this often per epoch, the counts of the interval summed.
TOKEN_ISSUED_LOG_INTERVAL_SECONDS = 1.0
# Allocations minus deallocations before a youngest-generation collection (CPython's default is 700).
GC_YOUNG_THRESHOLD = 50_000
# The HTTP workers' views ask the core to flush the store's memtable after a write burst
# (flush_store_for_views): at most one flush started this often for them, and none of a memtable
# whose WAL file holds less than this (a view replays that much in about 45 ms). Each such flush is
# one more, smaller, level-0 table file for the compactions to merge into the level below, whatever
# its size; so at most one in ten seconds (a fill flushes a full write buffer every few seconds).
VIEW_FLUSH_INTERVAL_SECONDS = 10.0
VIEW_FLUSH_MIN_BYTES = 4 * 1024 * 1024
# Written in the data directory when the store meets a damaged file: the node does not start on that
# store again until it is rebuilt or the file is removed (docs/failure-modes.md).
STORE_DAMAGED_FILE = "STORE-DAMAGED"
# A node whose certificate, or the CA's, expires sooner than this logs node.certificate_expiring at start.
CERTIFICATE_WARNING_DAYS = 30
# A damage record (STORE_DAMAGED_FILE): a time and the damage's message, itself bounded (store_layout.damage).
DAMAGE_RECORD_MAX_CHARS = 500


class TaskEnded(Exception):
    """The driver or the ticker returned, which they never do while the node runs."""


def _remove_backup_leftovers(work_root: Path) -> None:
    """Remove the backup checkpoints a process that died mid-stream left (Node's constructor); what cannot be
    removed is said, once: those files may hold rows deleted and shredded since (docs/guarantees.md)."""
    shutil.rmtree(work_root, ignore_errors=True)
    if os.path.lexists(work_root):
        try:
            left = sum(1 for _ in work_root.rglob("*")) if work_root.is_dir() else 1
        except OSError:
            left = -1  # not even listable
        log.warning("node.backup_leftovers_not_removed", directory=str(work_root), entries=left,
                    detail="remove it by hand with the node stopped: a backup checkpoint left there may hold "
                           "rows deleted and shredded since")


def fatal_text(error: BaseException) -> str:
    """What node.fatal says of ``error`` besides its type, 300 characters at most: an OSError's strerror
    and file; RocksDB's status (rocksdict raises it as a bare Exception; store_layout.reason cuts out the
    keys it quotes); the texts of this project's exceptions. Any other exception is a bug (a KeyError, a
    ValueError, ...) whose text may quote the data it was handling: only its type is logged."""
    if isinstance(error, OSError):
        if error.strerror:
            return (error.strerror + (f" ({error.filename})" if error.filename else ""))[:300]
        return str(error)[:300]
    if type(error) is Exception:
        return reason(error)[:300]
    if type(error).__module__.startswith(("tokenvault.", "protocol.")):
        return str(error)[:300]
    return "(its text is not logged: it may quote the data it was handling)"


class NodeBusy(Exception):
    """The driver's inbox is full: the request was not taken and had no effect (overload, not a lost primary)."""


class ProposalOutcomeUnknown(Exception):
    """The node stopped waiting for a proposal it had already made: it may still commit (once)."""


class ProposalLost(Exception):
    """A different entry was committed where this proposal stood: it never took effect."""


@dataclass(slots=True)
class _PendingProposal:
    view: int
    future: asyncio.Future[Any]


@dataclass(slots=True)
class _PendingRead:
    read_index: int
    future: asyncio.Future[Any]


class Node:
    """One vault node: WAL, store, key ring, replica and transport, driven by one loop."""

    def __init__(self, config: NodeConfig, metrics: Metrics | None = None) -> None:
        self.config = config
        self.node_id = config.node_id
        self.metrics = metrics or Metrics()
        # First, before the data directory is touched: a key source that cannot be used (or a key file
        # inside the data directory) stops the node with the reason, and removes TOKENVAULT_MASTER_KEY
        # and a PIN variable from the environment before the sealer or anything else can start.
        self.master_key = config.load_master_key()
        self.data_dir = Path(config.data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if (self.data_dir / "vault.db").exists() and not (self.data_dir / STORE_DIRECTORY).exists():
            raise StoreCorruption("this data directory holds a version 1 (SQLite) store, which this version "
                                  "cannot read; there is no migration from version 1 yet")
        _refuse_a_store_found_damaged(self.data_dir)
        # Made with the data directory, read on every start after: peers refuse a member whose directory
        # changed under its id (tokenvault/core/incarnations.py).
        self.incarnation = load_or_create_incarnation(self.data_dir)
        self.peer_incarnations = PeerIncarnations(self.data_dir)
        # What each member acknowledged of the committed log, as last made durable here (a member below it
        # counts in no election: docs/failure-modes.md).
        self.member_floors = MemberFloors(self.data_dir)
        self.store = VaultStore.open(self.data_dir / STORE_DIRECTORY,
                                     retention_ms=config.idempotency.retention_ms)
        self.wal, recovered = WriteAheadLog.open(self.data_dir / "wal",
                                                 max_segment_bytes=config.wal.max_segment_bytes,
                                                 fsync=config.wal.fsync)
        _refuse_a_store_behind_its_log(self.data_dir, self.store, self.wal, recovered)
        self.keyring = self._keyring_of_store()
        # Called after the keyring gained an epoch (an applied rotation, an installed snapshot): the
        # node's HTTP workers seal in the active epoch with keys the core gives them (tokenvault.api.workers).
        self.on_keyring_changed: Callable[[], None] | None = None
        # Called after the store's files were rewritten to erase removed rows (a shred pass) or replaced
        # (an installed snapshot): the HTTP workers' views of the store still hold the old files open
        # until they catch up (tokenvault.core.store_reader), so they are told to.
        self.on_store_files_replaced: Callable[[], None] | None = None
        # The shred passes due after a snapshot install until they are done (SHRED-WHOLE, SHRED-KEYS).
        self.shred_record = ShredRecord(self.data_dir)
        self.shredder = Shredder(lambda: self.store, self.wal, lambda error: self._fatal(error, task="shred"),
                                 on_pass=self._shred_passed, max_busy_fraction=config.shred.max_busy_fraction)
        self.restored = self._restored_state(recovered)
        self.recovered_log = recovered
        members = tuple(member.id for member in config.members)
        # A joining node (run_cluster.sh add-node) starts as a learner of the voters it was told of; the
        # configuration in its log or store, once it has one, replaces this bootstrap one.
        voters = tuple(member for member in members if member != self.node_id) if config.join else members
        self.replica = Replica(
            ReplicaConfig(node_id=self.node_id, members=voters, learners=(self.node_id,) if config.join else (),
                          election_timeout_ticks=config.timing.election_timeout_ticks,
                          heartbeat_interval_ticks=config.timing.heartbeat_interval_ticks,
                          snapshot_chunk_bytes=config.wal.snapshot_chunk_bytes),
            self.restored, random.Random())
        # TLS contexts are built before anything listens, so that a bad certificate stops the node at start.
        self.http_tls_context: ssl.SSLContext | None = None
        peer_tls: PeerTlsContexts | None = None
        self._node_tls: NodeTls | None = None
        if config.tls is not None:
            self._node_tls = load_node_tls(config.tls.files(), self.node_id)
            self.http_tls_context, peer_tls = self._node_tls.http_server, self._node_tls.peers
            self._watch_certificates(self._node_tls.expires_at)
        self.transport: PeerTransport | None = None
        if len(members) > 1:
            peers = self._peer_addresses(self.replica.membership)
            self.transport = PeerTransport(self.node_id, config.peer.host, config.peer.port, peers,
                                           config.load_cluster_secret(), self._on_peer_message,
                                           MAX_FRAME_BYTES, on_peer_down=self._on_peer_down,
                                           idle_timeout_seconds=_link_idle_timeout_seconds(config), tls=peer_tls,
                                           max_unauthenticated_connections=config.peer.max_unauthenticated_connections,
                                           incarnation=self.incarnation, admit=self.admit_peer,
                                           on_dropped=self.metrics.record_peer_message_dropped,
                                           settings=config.replicated_settings)
            self._follow_membership()  # links to the committed configuration's members too, not only the newest's
        self._inbox: deque[tuple[Any, ...]] = deque()
        self._wakeup = asyncio.Event()
        self._pending_proposals: dict[int, _PendingProposal] = {}
        self._pending_reads: dict[int, asyncio.Future[None]] = {}
        self._reads_waiting_apply: list[_PendingRead] = []
        self._read_ids = itertools.count(1)
        # The last applied index at which a mapping may have been removed or made unreadable (a delete,
        # a destroy, an expiry purge, an installed snapshot; any command kind not known to only add):
        # an HTTP worker's view of the store at or past it answers detokenize as this store would
        # (NodeService.detokenize_read_point). Everything before the store's state at open counts.
        self.removal_index = self.store.applied_index
        # The last applied index at which a tokenize set or replaced a mapping's metadata (or a snapshot
        # was installed): a worker's view at or past it answers a reveal's metadata as this store would.
        self.metadata_index = self.store.applied_index
        self._applied_since_compact = 0
        self._applied_bytes_since_compact = 0
        # (index, payload bytes) of the newest applied entries: how far back the kept log reaches.
        self._recent_entry_sizes: deque[tuple[int, int]] = deque(
            maxlen=config.wal.compact_keep_entries + config.wal.compact_every_entries)
        self._bootstrap_in_flight = False
        # What this start replayed (node.replayed), until the node has caught up with what a primary
        # committed (node.recovered, which says both); None from then on.
        self._recovery: dict[str, Any] | None = None
        self._recovery_started = 0.0
        self._snapshots_installed_since_start = 0
        self._tasks: list[asyncio.Task[None]] = []
        # The store's checkpoints (WAL compaction) run here, off the loop.
        self._disk_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"checkpoint-{self.node_id}")
        self._compaction: asyncio.Task[None] | None = None
        self._views_flushed_at = -float("inf")  # when flush_store_for_views last started a flush
        # token.issued: one line a second at most (per epoch), so the node log grows with time, not traffic.
        self._issued_log = SummedEvent(log, "token.issued", ("epoch",), TOKEN_ISSUED_LOG_INTERVAL_SECONDS)
        # A backup stream's checkpoint left by a process that died mid-stream: hard links to the store's
        # table files, it would keep the bytes of rows deleted (and epoch secrets destroyed) and shredded since.
        # No stream is open before the node starts; the store's lock, taken above, keeps a second process here.
        _remove_backup_leftovers(self.data_dir / BACKUP_WORK_DIR_NAME)
        self.snapshots = SnapshotTransfers(self.data_dir, lambda: self.store, self._run_in_driver,
                                           self.send_to_peer, self.shredder, self._peer_backlog_bytes)
        self.metrics.watch_disk(self._disk_free_bytes, self._store_table_bytes, lambda: float(self.wal.segment_bytes))
        self.metrics.watch_shred_backlog(lambda: float(self.shredder.backlog_keys), self.shredder.oldest_wait_seconds)
        self.metrics.watch_peers(self._peer_states)
        # Set by the service: handles ForwardRequest frames.
        self.forward_handler: Callable[[str, ForwardRequest], None] | None = None
        self.forward_response_handler: Callable[[str, ForwardResponse], None] | None = None
        # Set by the service: fails requests forwarded to that peer.
        self.peer_down_handler: Callable[[str], None] | None = None
        # Called with an epoch once its destroy is applied here (the service's sealer forgets its keys).
        self.epoch_destroyed_handlers: list[Callable[[int], None]] = []
        self.fatal_error: str | None = None
        self.close_failed = False  # the WAL or the store refused to close (node.close_failed)
        self.stopped = asyncio.Event()
        # A damaged store file met by a read or an apply stops the node (docs/failure-modes.md).
        self.store.on_damage = self._store_damaged

    # ----------------------------------------------------------------- start-up
    def _keyring_of_store(self) -> KeyRing:
        """Every epoch the store holds, unwrapped with the master key; a destroyed one has no secret left."""
        return KeyRing.from_wrapped(self.master_key, self.store.wrapped_secrets())

    def _restored_state(self, recovered: RecoveredLog) -> RestoredState:
        """Combine the store's checkpoint and the WAL into the core's starting point.

        The store may be ahead of the WAL's base (segments below the durable
        checkpoint are deleted), so the log base is whichever is further along;
        WAL entries at or below it were applied already.
        """
        base_index, base_view = recovered.base_index, recovered.base_view
        entries = recovered.entries
        store_position = (self.store.applied_index, self.store.applied_view)
        if store_position[0] > base_index:
            held = next((entry.view for entry in entries if entry.index == store_position[0]), None)
            if held != store_position[1]:
                # The store holds a snapshot the log does not lead to: the node stopped
                # between the store's switch and the log reset. The log's entries are all
                # covered by the snapshot or conflict with it (uncommitted), so the log
                # restarts after the store, as the install would have left it.
                log.warning("node.log_reset_to_store", store_index=store_position[0],
                            log_base_index=base_index, log_entries=len(entries))
                self.wal.reset_base(*store_position)
                entries = ()
            base_index, base_view = store_position
        entries = tuple(entry for entry in entries if entry.index > base_index)
        expected = base_index + 1
        for entry in entries:
            if entry.index != expected:
                raise WalCorruption(f"log gap: expected index {expected}, found {entry.index}")
            expected += 1
        hard_state = recovered.hard_state or INITIAL_HARD_STATE
        if hard_state.commit_index < base_index:
            hard_state = HardState(hard_state.view, hard_state.voted_for, base_index)
        # first_poll: above every poll number an earlier start used, clock set back or not (take_poll_base).
        return RestoredState(hard_state=hard_state, snapshot_index=base_index, snapshot_view=base_view,
                             entries=entries, membership=self.store.membership(), floors=self.member_floors.loaded,
                             first_poll=take_poll_base(self.data_dir))

    def admit_peer(self, member: str, incarnation: bytes) -> bool:
        """Whether ``member``, which proved the cluster secret in ``incarnation``, may link
        (PeerIncarnations.admit), with its ``since`` as this node's configurations say: the higher of the
        one in effect's and the last committed one's (0 where neither has it). A configuration in effect
        that adds an id again follows the committed removal of its earlier member (a change is proposed
        only once the one before it is committed), so its higher ``since`` is safe to go by."""
        since = max(membership.since(member) or 0
                    for membership in (self.replica.membership, self._committed_membership()))
        return self.peer_incarnations.admit(member, incarnation, since)

    def _committed_membership(self) -> Membership:
        return self.store.membership() or Membership.of(tuple(member.id for member in self.config.members))

    def _follow_membership(self) -> None:
        """Peer links to the members of the configuration in effect and of the last committed one: while a
        change is not committed both sets may be needed (a removed primary commits its own removal;
        a member the change adds catches up)."""
        if self.transport is None:
            return
        committed = self._committed_membership()
        addresses = {peer.node_id: peer for peer in self._peer_addresses(committed)}
        addresses.update((peer.node_id, peer) for peer in self._peer_addresses(self.replica.membership))
        left = set(self.transport.peers) - set(addresses)
        self.transport.set_peers(list(addresses.values()))
        for member in left:  # gone from the configuration: its record goes, so the file holds the members there are
            self.peer_incarnations.forget(member)

    def _peer_addresses(self, membership: Membership) -> list[PeerAddress]:
        """Where each member of a configuration listens for peers: the address the configuration entry
        carries, else the static config's (the first cluster's members have none in the bootstrap)."""
        static = {member.id: member for member in self.config.members}
        addresses = []
        for member in membership.members:
            if member.address:
                try:
                    host, port = split_host_port("peer_addr", member.address)
                except ConfigError:
                    # The primary checked it when the change was asked for; a log holding another is not
                    # one this node can dial, and must not stop it.
                    log.warning("membership.bad_address", member=member.node_id)
                    continue
                addresses.append(PeerAddress(member.node_id, host, port))
            elif member.node_id in static:
                entry = static[member.node_id]
                addresses.append(PeerAddress(member.node_id, entry.peer_host, entry.peer_port))
        return addresses

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.transport is not None:
            await self.transport.start()
        for coroutine, name in ((self._drive(), "driver"), (self._tick_forever(), "ticker")):
            task = loop.create_task(coroutine, name=name)
            task.add_done_callback(self._on_task_ended)
            self._tasks.append(task)
        # The records first: they are at or below the store's index, and the shredder takes entries in log order.
        for index, pending in self.shred_record.recover(self.store.applied_index):
            self.shredder.note_pending(index, pending)
        self.shredder.note_recovered(self.recovered_log.entries, self.store.applied_index)
        log.info("node.started", members=[member.id for member in self.config.members],
                 http_port=self.config.http.port, peer_port=self.config.peer.port,
                 applied_index=self.store.applied_index, view=self.restored.hard_state.view)
        self._recovery = {"wal_entries": len(self.restored.entries), "log_base_index": self.restored.snapshot_index,
                          "store_applied_index": self.store.applied_index,
                          "commit_index": self.restored.hard_state.commit_index,
                          "truncated_tail_bytes": self.recovered_log.truncated_tail_bytes,
                          "view": self.restored.hard_state.view}
        self._recovery_started = time.monotonic()
        log.info("node.replayed", **self._recovery)
        self._wake()

    async def close(self) -> None:
        await cancel_and_wait(self._tasks)
        self._issued_log.flush()  # counts of the last interval, before the node goes
        await asyncio.to_thread(self.member_floors.save)  # the latest floors offered, if not written yet
        if self.transport is not None:
            await self.transport.close()
        self._fail_pending()  # callers answer 503: this node is going away
        await cancel_and_wait([self._compaction])
        await self.shredder.close()
        await self.snapshots.close()
        self._disk_executor.shutdown(wait=True)
        for part, close in (("wal", self.wal.close), ("store", self.store.close)):
            try:
                close()
            except (StoreError, OSError) as error:
                # After a failed write (a full disk, say) the files refuse more; the node stops anyway and the
                # next start recovers from what they hold, as after a kill. Said once, never a traceback.
                self.close_failed = True
                log.error("node.close_failed", part=part, error=str(error)[:300])
        close_key = getattr(self.master_key, "close", None)  # a PKCS#11 session is logged out
        if close_key is not None:
            close_key()

    # ----------------------------------------------------------------- inputs
    def _wake(self) -> None:
        self._wakeup.set()

    def _enqueue(self, item: tuple[Any, ...]) -> None:
        if len(self._inbox) >= INBOX_MAX_ITEMS:
            raise NodeBusy()
        self._inbox.append(item)
        self._wake()

    def _on_peer_message(self, sender: str, message: object) -> None:
        if isinstance(message, ForwardRequest):
            if self.forward_handler is not None:
                self.forward_handler(sender, message)
            return
        if isinstance(message, ForwardResponse):
            if self.forward_response_handler is not None:
                self.forward_response_handler(sender, message)
            return
        if len(self._inbox) < INBOX_MAX_ITEMS:
            self._inbox.append(("step", sender, message))
            self._wake()

    def _on_peer_down(self, peer_id: str) -> None:
        if self.peer_down_handler is not None:
            self.peer_down_handler(peer_id)

    async def propose(self, payload: bytes, timeout_seconds: float) -> ApplyResult:
        """Replicate one command; resolves with the store's result once it is applied here.

        Raises NotPrimary when this node is not the primary, NodeBusy or
        ProposalRejected when it is overloaded, ProposalLost when a
        different entry took its place, and asyncio.TimeoutError when it did not
        commit in time (it may still commit later: callers answer 503).
        """
        result: asyncio.Future[ApplyResult] = asyncio.get_running_loop().create_future()
        self._enqueue(("propose", payload, result))
        return await await_future(result, timeout_seconds)

    async def change_membership(self, change: Callable[[Membership], Membership], timeout_seconds: float) -> int:
        """Propose the configuration ``change`` makes of the current one; returns its index once committed
        and applied here. Raises NotPrimary, MembershipError (the change makes no sense: a member
        already, not a member), ProposalRejected (not now: a change pending, a learner behind) and
        asyncio.TimeoutError as ``propose`` does."""
        result: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._enqueue(("membership", change, result))
        return await await_future(result, timeout_seconds)

    async def read_barrier(self, timeout_seconds: float) -> None:
        """Linearizable read point: returns once this node's store reflects every write acknowledged before.

        On the primary after a heartbeat round; on a backup after the primary
        answered its ReadIndex and this store applied that far. Raises
        NotPrimary when no primary is known or it refused, NodeBusy when
        too many reads wait.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._enqueue(("read", next(self._read_ids), future))
        await await_future(future, timeout_seconds)

    async def wait_applied(self, index: int, timeout_seconds: float) -> None:
        """Return once this node's store has applied ``index`` (at once if it has); asyncio.TimeoutError
        otherwise. The entry must be committed already (its index came from the primary)."""
        if self.store.applied_index >= index:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._reads_waiting_apply.append(_PendingRead(index, future))
        await await_future(future, timeout_seconds)

    async def flush_store_for_views(self) -> bool:
        """Start a flush of the store's memtable for the HTTP workers' views; whether one is under way.

        A worker's view replays the store's live WAL file to catch up, with its GIL held, and after a
        write burst that file holds up to a whole write buffer (64 MiB: about a second of the worker's
        loop). A flush starts a new file, and a view that opens again after it replays only that one:
        RocksDB writes the table file in its own threads. A worker asks only after a burst, once writes
        have calmed down (tokenvault.core.store_reader), and all of them at about the same time, so at
        most one flush a VIEW_FLUSH_INTERVAL_SECONDS is started here; between two, the answer only says
        whether the last one is still running (if not, a view replays)."""
        now, before = time.monotonic(), self._views_flushed_at
        may_start = now - before >= VIEW_FLUSH_INTERVAL_SECONDS
        if may_start:
            self._views_flushed_at = now  # claimed before the wait: the other workers ask meanwhile
        try:  # too soon for another: only whether one runs
            state = await asyncio.get_running_loop().run_in_executor(
                self._disk_executor, self.store.flush_memtable, VIEW_FLUSH_MIN_BYTES if may_start else None)
        except StoreError:  # closing, or a failed flush: the view replays instead
            state = None
        if state == "started":
            self.metrics.store_view_flushes.inc()
        elif may_start:
            self._views_flushed_at = before  # none started: the next ask may start one
        return state is not None

    def send_to_peer(self, peer_id: str, message: Message) -> bool:
        """Queue ``message`` on the link to ``peer_id``; False without a link or when its queue is full."""
        return self.transport is not None and self.transport.send(peer_id, message)

    def is_linked(self, peer_id: str) -> bool:
        return self.transport is not None and self.transport.is_connected(peer_id)

    def _peer_backlog_bytes(self, peer_id: str) -> int:
        return 0 if self.transport is None else self.transport.backlog_bytes(peer_id)

    # ----------------------------------------------------------------- driver
    async def _tick_forever(self) -> None:
        interval = self.config.timing.tick_ms / 1000.0
        while True:
            await asyncio.sleep(interval)
            self._inbox.append(("tick",))
            self._wake()

    async def _drive(self) -> None:
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup.clear()
                self._drain_inbox()
                while self.replica.has_ready():
                    floors = self.replica.floors  # kept once this Ready's hard state is durable
                    ready = self.replica.ready()
                    await self._handle_ready(ready)
                    self.replica.advance(ready)
                    if self.member_floors.offer(floors):
                        asyncio.get_running_loop().run_in_executor(None, self.member_floors.save)
                    # Let the ticker, the transport and HTTP handlers run between two
                    # Readies: a run of apply-only Readies would otherwise hold the loop.
                    await asyncio.sleep(0)
                    self._drain_inbox()
                self._maybe_bootstrap_epoch()
        except asyncio.CancelledError:
            raise
        except BaseException as error:  # a storage failure: the node must stop, never go on
            self._fatal(error)  # once: a damaged store may have stopped it already (_store_damaged)
            raise

    def _on_task_ended(self, task: asyncio.Task[None]) -> None:
        """The driver and the ticker run for the node's whole life: one that ends takes the node down.

        A node without its ticker sends no heartbeats and starts no elections,
        and one without its driver answers nothing; either would look alive to
        its peers and its clients while doing nothing, so it stops instead.
        """
        if task.cancelled() or self.stopped.is_set():
            return
        error = task.exception()
        if error is None:
            error = TaskEnded(f"the {task.get_name()} task ended")
        self._fatal(error, task=task.get_name())

    def reload_tls(self) -> bool:
        """SIGHUP: load the node's certificate, key and CA files again (rotation without a restart,
        docs/security.md); False, and the old ones kept, when they are not usable."""
        if self.config.tls is None or self._node_tls is None:
            log.warning("tls.reload_skipped", reason="this node has no [tls] section")
            return False
        try:
            expiry_times = reload_node_tls(self._node_tls, self.config.tls.files(), self.node_id)
        except TlsError as error:
            log.error("tls.reload_failed", reason=str(error)[:300], detail="the node goes on with the files it had")
            return False
        log.info("tls.reloaded", **{f"{name}_expires_at": when.isoformat() for name, when in expiry_times.items()})
        self._watch_certificates(expiry_times)
        return True

    def _watch_certificates(self, expiry_times: Mapping[str, datetime.datetime]) -> None:
        """Expose when the node's certificate and the CA's expire, and warn (at start, and at each reload)
        when that is near: new files are loaded on SIGHUP (docs/security.md)."""
        now = datetime.datetime.now(datetime.timezone.utc)
        for name, expires_at in expiry_times.items():
            self.metrics.certificate_expiry.labels(certificate=name).set(expires_at.timestamp())
            days_left = (expires_at - now).total_seconds() / 86400
            if days_left < CERTIFICATE_WARNING_DAYS:
                log.warning("node.certificate_expiring", certificate=name, expires_at=expires_at.isoformat(),
                            days_left=round(days_left, 1))

    def _store_damaged(self, error: StoreDamaged) -> None:
        """The store met a damaged file: stop rather than fail every request that meets it. The other nodes
        hold the data; this one is replaced by a new node (docs/failure-modes.md). The
        damage is written down first, so that a restart refuses to serve from the same files."""
        if self.fatal_error is not None:
            return
        try:
            _write_damage_marker(self.data_dir, str(error))
        except OSError as failure:  # the node stops all the same; the next start may serve until it meets it
            log.error("node.damage_not_recorded", reason=failure.strerror or type(failure).__name__)
        self._fatal(error, task="store")

    def _fatal(self, error: BaseException, task: str = "driver") -> None:
        """Stop the node for ``error``: said once, the first cause kept (a second failure on the way
        down, from another task, is a consequence and changes neither)."""
        if self.fatal_error is not None:
            return
        self.fatal_error = f"{type(error).__name__}: {fatal_text(error)}"
        log.critical("node.fatal", error=self.fatal_error, task=task)
        self.stopped.set()

    def _drain_inbox(self) -> None:
        replica = self.replica
        while self._inbox:
            item = self._inbox.popleft()
            kind = item[0]
            if kind == "step":
                replica.step(item[1], item[2])
            elif kind == "tick":
                replica.tick()
            elif kind == "propose":
                self._propose_now(item[1], item[2])
            elif kind == "read":
                self._read_now(item[1], item[2])
            elif kind == "membership":
                self._change_membership_now(item[1], item[2])
            elif kind == "call":
                item[1]()

    def _run_in_driver(self, function: Callable[[], object]) -> None:
        """Run ``function`` in the driver task, between two Readies: the core is never re-entered."""
        self._inbox.append(("call", function))
        self._wake()

    def _propose_now(self, payload: bytes, result: asyncio.Future[ApplyResult]) -> None:
        if result.done():
            return  # the caller gave up while this waited in the inbox: never propose it
        try:
            index, view = self.replica.propose(payload)
        except (NotPrimary, ProposalRejected) as error:
            result.set_exception(error)
            return
        previous = self._pending_proposals.pop(index, None)
        if previous is not None and not previous.future.done():
            # This log lost the earlier entry (a later primary's shorter log replaced its tail, or a snapshot
            # reset it), but another replica may still hold it and a primary holding it commit it: nothing
            # proves it had no effect, so it is not ProposalLost.
            previous.future.set_exception(ProposalOutcomeUnknown("a later proposal of this node took the "
                                                                 "index where this write stood"))
        self._pending_proposals[index] = _PendingProposal(view, result)

    def _change_membership_now(self, change: Callable[[Membership], Membership], result: asyncio.Future[Any]) -> None:
        if result.done():
            return
        try:
            index, view = self.replica.propose_membership(change(self.replica.membership))
        except (NotPrimary, ProposalRejected, MembershipError) as error:
            result.set_exception(error)
            return
        log.info("membership.proposed", index=index, view=view)
        outcome: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        outcome.add_done_callback(lambda done: _settle(result, done, index))
        self._pending_proposals[index] = _PendingProposal(view, outcome)

    def _read_now(self, request_id: int, future: asyncio.Future[None]) -> None:
        if future.done():
            return
        try:
            self.replica.request_read(request_id)
        except NotPrimary as error:
            future.set_exception(error)
            return
        self._pending_reads[request_id] = future

    async def _handle_ready(self, ready: Ready) -> None:
        if ready.snapshot is not None:
            # The store switched to the snapshot already; the log now starts after it.
            self.wal.reset_base(ready.snapshot.index, ready.snapshot.view)
        # The core's statement of the order (protocol/records.py, Ready): the
        # primary's own appends, heartbeats and snapshot chunks leave while its
        # disk write runs, and entries an earlier batch made durable are applied
        # (and answered) before this batch's fsync.
        for destination, message in ready.messages:
            self.send_to_peer(destination, message)
        for read in ready.snapshot_reads:
            self.snapshots.send_chunk(read)
        if ready.committed_durable_count:
            self._apply(ready.committed_durable)
        if ready.entries or ready.hard_state is not None or ready.truncate_from is not None:
            self.wal.append(truncate_from=ready.truncate_from, entries=ready.entries,
                            hard_state=ready.hard_state)
        if ready.must_sync:
            if self.transport is not None:
                # The messages above were only queued: out before the fsync holds the loop.
                self.transport.flush()
            started = time.perf_counter()
            # On the loop itself, as etcd's raft loop does: what arrives meanwhile waits in the
            # sockets and forms the next batch (group commit). In a worker thread the loop ran
            # smaller batches and the thread's wake-ups and GIL hand-offs cost more than the
            # overlap gained (docs/performance.md, thirteenth sitting).
            self.wal.sync()
            self.metrics.observe_wal_sync(time.perf_counter() - started, len(ready.entries),
                                          sum(len(entry.payload) for entry in ready.entries))
        if ready.snapshot_chunks:
            # Staged before the replies that acknowledge them leave.
            await self.snapshots.stage(ready.snapshot_chunks, self._switch_to_snapshot,
                                       self.replica.snapshot_failed)
        for destination, message in ready.messages_after_persist:
            self.send_to_peer(destination, message)
        if len(ready.committed) > ready.committed_durable_count:
            self._apply(ready.committed_after_persist)
        for result in ready.read_results:
            self._on_read_result(result)
        for peer_id, outcome in ready.snapshot_transfers_ended:
            self.snapshots.ended(peer_id, outcome)
        for peer_id in ready.snapshot_requests:
            self.snapshots.request(peer_id, self.replica.offer_snapshot)
        for event in ready.events:
            self._log_event(event)
        self._check_recovered()
        if self.replica.role != Role.PRIMARY:
            self.snapshots.drop_sources()
        self._release_reads()
        self._update_gauges()

    def _check_recovered(self) -> None:
        """node.recovered, once: this node's store has applied what a primary had committed when its first
        heartbeat after this start said so (Heartbeat.cluster_commit_index; as the primary, what it first committed
        in its view): it has caught up since its start, by its log or by a snapshot. The target does not move
        (Replica.first_known_commit_index), so a node that keeps pace with the writes from behind reaches it."""
        target = self.replica.first_known_commit_index
        if self._recovery is None or target is None or self.store.applied_index < target:
            return
        log.info("node.recovered", **self._recovery, caught_up_index=self.store.applied_index,
                 primary=self.replica.primary_id, snapshots_installed=self._snapshots_installed_since_start,
                 seconds=round(time.monotonic() - self._recovery_started, 3))
        self._recovery = None

    def _switch_to_snapshot(self, prepared: PreparedInstall, index: int, view: int,
                            pending: PendingShred | None) -> None:
        """In the driver: the verified, opened snapshot becomes the store, then the core follows it."""
        if self.store.applied_index >= index:
            # The log caught up meanwhile (a new primary's appends): the snapshot is not needed.
            self.snapshots.close_later(lambda: self.store.abort_install(prepared))
            self.replica.snapshot_failed(index, view)
            return
        if pending is not None:
            # The snapshot's files may hold rows its source had deleted and not yet shredded (its manifest says
            # so), whose deletes this node will never apply: a pass of their keys, or of the whole key space
            # when the manifest does not list them, follows, recorded first so that a restart does it too.
            self.shred_record.record(index, pending)
        old = self.store.commit_install(prepared)
        # Proposals this node made as a primary at indexes the snapshot covers are never applied here: each
        # may be in the snapshot or not. Answered now, as the service answers any write it stopped waiting
        # for ("may still take effect, once"); kept, they stayed for the life of the process, each future
        # holding its command through its timeout's traceback.
        for covered in [at for at in self._pending_proposals if at <= index]:
            waiting = self._pending_proposals.pop(covered).future
            if not waiting.done():
                waiting.set_exception(ProposalOutcomeUnknown("a snapshot replaced the log where this write stood"))
        if pending is not None:
            self.shredder.note_pending(index, pending)
        self.removal_index = max(self.removal_index, index)
        self.metadata_index = max(self.metadata_index, index)
        self.snapshots.close_later(old)
        self.keyring = self._keyring_of_store()
        self._keyring_changed()
        self._store_files_replaced()
        self.replica.snapshot_installed(index, view, self.store.membership())
        self._snapshots_installed_since_start += 1
        log.info("snapshot.installed", index=index, view=view, tokens=self.store.token_count(),
                 shred_pending=pending is not None,
                 shred_keys=None if pending is None else pending.key_count)

    def _shred_passed(self, done: ShredPass) -> None:
        self.metrics.observe_shred_pass(done.store_seconds, done.whole_store)
        self._store_files_replaced()
        self.shred_record.passed(done)

    # ----------------------------------------------------------------- apply
    def _apply(self, entries: tuple[Entry, ...]) -> None:
        results = self.store.apply_batch(entries)
        by_index = {result.index: result for result in results}
        issued: dict[int, int] = {}  # epoch -> tokens issued in it by this batch
        for entry in entries:
            result = by_index.get(entry.index)
            if entry.kind == EntryKind.CONFIG:
                log.info("membership.committed", index=entry.index)
                self._follow_membership()
            if result is not None and entry.kind == EntryKind.COMMAND:
                if result.kind not in ONLY_ADDING_KINDS:
                    self.removal_index = entry.index
                if result.sets_metadata:
                    self.metadata_index = entry.index
                count, epoch = self._after_apply(entry, result)
                if count:
                    issued[epoch] = issued.get(epoch, 0) + count
            pending = self._pending_proposals.pop(entry.index, None)
            if pending is None or pending.future.done():
                continue
            if pending.view != entry.view:
                pending.future.set_exception(ProposalLost("another entry was committed at this index"))
            elif entry.kind == EntryKind.CONFIG:
                pending.future.set_result(None)  # a configuration change has no result but its commit
            elif result is None:
                # Same index, same view: by log matching this is the proposed entry, and the store found it
                # applied already, so it took effect, once; only its result is not here to answer with.
                pending.future.set_exception(ProposalOutcomeUnknown("the write was applied without its result "
                                                                    "reaching this request"))
            else:
                pending.future.set_result(result)
        if issued and self.replica.role == Role.PRIMARY:
            for epoch, count in issued.items():
                self._issued_log.add(count, epoch)
            self.metrics.record_tokens_issued(sum(issued.values()))
        self._applied_since_compact += len(entries)
        sizes = [(entry.index, len(entry.payload)) for entry in entries]
        self._recent_entry_sizes.extend(sizes)
        self._applied_bytes_since_compact += sum(size for _, size in sizes)
        wal = self.config.wal
        if (self._applied_since_compact >= wal.compact_every_entries
                or self._applied_bytes_since_compact >= wal.compact_every_bytes):
            self._compact()

    def _after_apply(self, entry: Entry, result: ApplyResult) -> tuple[int, int]:
        """Follow-ups of one applied command: new epoch keys, and the counts for token.issued."""
        if result.outcome != Outcome.OK:
            return 0, 0
        if result.kind == "rotate":
            command = commands.decode_command(entry.payload)
            assert isinstance(command, commands.RotateEpochCommand), "a rotate result comes from a rotate entry"
            self.keyring.add(command.epoch, command.wrapped_secret)
            self._keyring_changed()
            log.info("epoch.rotated", epoch=command.epoch, index=entry.index)
            return 0, 0
        if result.kind in (DELETE_KIND, DESTROY_KIND):
            command = commands.decode_command(entry.payload)
            if isinstance(command, commands.DestroyEpochCommand):
                self.keyring.forget(command.epoch)
                for handler in self.epoch_destroyed_handlers:
                    handler(command.epoch)
                # The HTTP workers drop the epoch's keys before any later answer reaches them.
                self._keyring_changed()
                log.info("epoch.destroyed", epoch=command.epoch, index=entry.index)
            else:
                log.info("tokens.deleted", count=result.items, index=entry.index)
            self.shredder.note(entry.index, command)
            return 0, 0
        if result.kind != "tokenize":
            return 0, 0  # key changes and audit batches issue no tokens
        return result.items, result.epoch

    def _store_files_replaced(self) -> None:
        if self.on_store_files_replaced is not None:
            self.on_store_files_replaced()

    def _keyring_changed(self) -> None:
        if self.on_keyring_changed is not None:
            self.on_keyring_changed()

    def _compact(self) -> None:
        self._applied_since_compact = 0
        self._applied_bytes_since_compact = 0
        if self._compaction is None or self._compaction.done():
            self._compaction = asyncio.get_running_loop().create_task(self._compact_off_loop())

    async def _compact_off_loop(self) -> None:
        """Make the store durable in a worker thread, then drop the log it covers."""
        try:
            loop = asyncio.get_running_loop()
            durable_index = await loop.run_in_executor(self._disk_executor, self.store.checkpoint)
            hold = self.shredder.hold_index()
            # A shredding entry stays in the log until the store's files are shredded (shred.py). The
            # segments' files are deleted in the thread too: about 17 ms each that the loop does not wait.
            await loop.run_in_executor(self._disk_executor, self.wal.release,
                                       durable_index if hold is None else min(durable_index, hold - 1))
        except asyncio.CancelledError:
            raise
        except BaseException as error:  # a storage failure, as in the driver: stop
            self._fatal(error, task="compaction")
            return
        compact_to = min(durable_index, max(durable_index - self.config.wal.compact_keep_entries,
                                            self._oldest_index_beyond_keep_bytes()))
        held = self.snapshots.hold_index()
        if held is not None:
            compact_to = min(compact_to, held)  # a backup receiving a snapshot continues from it
        if compact_to > 0:
            self._run_in_driver(lambda: self.replica.compact(compact_to))

    def _oldest_index_beyond_keep_bytes(self) -> int:
        """The highest index such that the entries after it hold more than compact_keep_bytes (0 if none)."""
        kept_bytes = 0
        for index, size in reversed(self._recent_entry_sizes):
            kept_bytes += size
            if kept_bytes > self.config.wal.compact_keep_bytes:
                return index
        return 0

    # ----------------------------------------------------------------- reads
    def _on_read_result(self, result: ReadResult) -> None:
        future = self._pending_reads.pop(result.request_id, None)
        if future is None or future.done():
            return
        if not result.ok:
            future.set_exception(NodeBusy() if result.overloaded else NotPrimary(self.replica.primary_id))
            return
        self._reads_waiting_apply.append(_PendingRead(result.read_index, future))

    def _release_reads(self) -> None:
        if not self._reads_waiting_apply:
            return
        applied = self.store.applied_index
        still_waiting = []
        for pending in self._reads_waiting_apply:
            if pending.future.done():
                continue
            if applied >= pending.read_index:
                pending.future.set_result(None)
            else:
                still_waiting.append(pending)
        self._reads_waiting_apply = still_waiting

    # ----------------------------------------------------------------- roles
    def _log_event(self, event: Event) -> None:
        if isinstance(event, BecamePrimary):
            log.info("primary.elected", primary=self.node_id, view=event.view)
        elif isinstance(event, SteppedDown):
            log.warning("primary.stepped_down", view=event.view, reason=event.reason)
            # Proposals of a deposed primary may still commit under the new one, so
            # they keep waiting; their callers time out into a 503 otherwise.
            for future in self._pending_reads.values():
                if not future.done():
                    future.set_exception(NotPrimary(None))
            self._pending_reads.clear()
        elif isinstance(event, PrimaryChanged):
            log.info("primary.changed", view=event.view, primary=event.primary_id)
        elif isinstance(event, ElectionStarted):
            log.info("election.started", view=event.view, reason=event.reason)
        elif isinstance(event, MembershipChanged):
            membership = event.membership
            log.info("membership.changed", index=event.index, voters=list(membership.voters),
                     learners=list(membership.learners))
            self._follow_membership()
        elif isinstance(event, BackupLostEntries):
            self.metrics.record_backup_lost_entries(event.peer)
            log.error("replica.backup_lost_entries", peer=event.peer, acknowledged_index=event.acknowledged_index,
                      refused_index=event.refused_index,
                      detail="the backup no longer holds log entries it acknowledged as written to its disk "
                      "(its data directory restored from an older copy, or a disk that lost fsynced writes); "
                      "it counts for nothing new here, and may stay behind until a snapshot or another "
                      "primary catches it up; replace it (docs/failure-modes.md)")
        elif isinstance(event, MemberBelowFloor):
            self.metrics.record_member_below_floor(event.member)
            log.error("replica.member_below_floor", peer=event.member, floor=event.floor,
                      last_index=event.last_index, as_what=event.as_what,
                      detail="the member's log ends below what it once acknowledged of the committed log (its "
                      "data directory restored from an older copy, or a disk that lost fsynced writes); its "
                      "votes do not count and it is not voted for while it stays there, so with too few other "
                      "members no primary is elected until one that holds those entries is back; replace it "
                      "(docs/failure-modes.md)")
        else:
            log.info("replica.event", kind=type(event).__name__)

    def _maybe_bootstrap_epoch(self) -> None:
        """The first primary of a new cluster creates epoch 1; apply refuses duplicates."""
        if self._bootstrap_in_flight or self.replica.role != Role.PRIMARY:
            return
        if self.store.active_epoch() != 0 or self.replica.commit_index < 1:
            return
        command = commands.RotateEpochCommand(
            epoch=1, wrapped_secret=self.master_key.wrap_epoch_secret(1, new_epoch_secret()),
            created_at_ms=int(time.time() * 1000), principal=None, idempotency_key=None, fingerprint=None,
            actor=commands.Actor(node=self.node_id, request_id="bootstrap"))
        self._bootstrap_in_flight = True
        task = asyncio.get_running_loop().create_task(self._bootstrap(commands.encode_command(command)))
        self._tasks.append(task)

    async def _bootstrap(self, payload: bytes) -> None:
        try:
            await self.propose(payload, self.config.timing.request_timeout_ms / 1000)
        except (NotPrimary, ProposalLost, asyncio.TimeoutError):
            pass
        finally:
            self._bootstrap_in_flight = False
            self._wake()

    # ----------------------------------------------------------------- state
    def abort_requests(self) -> None:
        """Answer everything waiting (503 to clients): the node is stopping."""
        self._fail_pending()

    def _fail_pending(self) -> None:
        # A proposal already in the log may still commit, so its caller must not
        # retry it elsewhere on its own; work never proposed can safely go elsewhere.
        for pending in self._pending_proposals.values():
            if not pending.future.done():
                pending.future.set_exception(ProposalOutcomeUnknown("the node stopped before the write committed"))
        futures = list(self._pending_reads.values()) + [pending.future for pending in self._reads_waiting_apply]
        futures += [item[-1] for item in self._inbox if item[0] in ("propose", "read", "membership")]
        for future in futures:
            if not future.done():
                future.set_exception(NotPrimary(None))
        self._pending_proposals.clear()
        self._pending_reads.clear()
        self._reads_waiting_apply.clear()
        self._inbox.clear()

    def _update_gauges(self) -> None:
        self.metrics.set_replication(role=self.role_name(), view=self.replica.view,
                                     commit_index=self.replica.commit_index,
                                     applied_index=self.store.applied_index,
                                     active_epoch=self.store.active_epoch())

    def _peer_states(self) -> dict[str, tuple[bool, int | None]]:
        """Each peer's link state and, on the primary, its match index (tokenvault_peer_reachable and
        tokenvault_peer_match_index, read when /metrics is rendered)."""
        if self.transport is None:
            return {}
        progress = self.replica.progress()
        return {peer: (self.transport.is_connected(peer), progress[peer][0] if peer in progress else None)
                for peer in self.transport.peers}

    def _disk_free_bytes(self) -> float:
        """What the file system of the data directory has free for this node (tokenvault_data_disk_free_bytes)."""
        try:
            stats = os.statvfs(self.data_dir)
        except OSError:
            return math.nan
        return float(stats.f_bavail * stats.f_frsize)

    def _store_table_bytes(self) -> float:
        try:
            return float(self.store.table_bytes())
        except Exception:  # noqa: BLE001 - a store closed, or failing: the gauge says nothing this time
            return math.nan

    def role_name(self) -> str:
        role = self.replica.role
        return "primary" if role == Role.PRIMARY else ("candidate" if role == Role.CANDIDATE else "backup")

    def health(self) -> dict[str, Any]:
        document = {"status": "ok", "node_id": self.node_id, "role": self.role_name(), "view": self.replica.view,
                    "primary_id": self.replica.primary_id, "commit_index": self.replica.commit_index,
                    "applied_index": self.store.applied_index, "active_epoch": self.store.active_epoch()}
        refused_by = self.transport.refused_by() if self.transport is not None else []
        if refused_by:  # peers refuse this member (its incarnation changed): it counts in no majority
            document["refused_by"] = refused_by
        return document


def _write_damage_marker(data_dir: Path, reason: str) -> None:
    """Write down, durably, that the store in ``data_dir`` met a damaged file and why (file names and
    offsets only: tokenvault.core.store_layout.damage)."""
    record = f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {reason}"[:DAMAGE_RECORD_MAX_CHARS]
    replace_file(data_dir / STORE_DAMAGED_FILE, f"{record}\n".encode(), data_dir / (STORE_DAMAGED_FILE + ".tmp"))


def _refuse_a_store_found_damaged(data_dir: Path) -> None:
    """A node whose store met a damaged file does not start on it again (docs/failure-modes.md)."""
    path = data_dir / STORE_DAMAGED_FILE
    if not path.exists():
        return
    try:
        with open(path, "rb") as marker:  # the file may have been edited: read what a record holds at most
            recorded = marker.read(DAMAGE_RECORD_MAX_CHARS).decode("utf-8", errors="replace").strip()
    except OSError:
        recorded = "(the record cannot be read)"
    raise StoreCorruption(f"this node's store was found damaged ({recorded}); replace the node: add a new one "
                          "and remove this one from the cluster (docs/failure-modes.md; a node alone: restore "
                          f"it from a backup), or remove {path} to start on these files anyway")


def _refuse_a_store_behind_its_log(data_dir: Path, store: VaultStore, wal: WriteAheadLog,
                                   recovered: RecoveredLog) -> None:
    """The log is released only up to an index the store made durable (VaultStore.checkpoint) and reset
    only once the store holds the snapshot it starts from, so a store applied below the log's base lost
    writes it had made durable (RocksDB recovered its own WAL only up to a damaged record; the store
    directory was put back from an older copy): the entries between are in neither. Nothing is changed
    and both are closed; the node does not start (docs/failure-modes.md)."""
    if store.applied_index >= recovered.base_index:
        return
    wal.close()
    store.close()
    raise StoreCorruption(
        f"the store in {data_dir / STORE_DIRECTORY} is applied through index {store.applied_index}, but the "
        f"write-ahead log in {data_dir / 'wal'} starts after index {recovered.base_index}: the entries between "
        "are in neither, so the store lost writes it had made durable (a damaged RocksDB WAL, or a store put "
        "back from an older copy); replace the node: add a new one and remove this one from the cluster "
        "(docs/failure-modes.md; a node alone: restore it from a backup)")


def _settle(result: asyncio.Future[Any], done: asyncio.Future[Any], index: int) -> None:
    """Pass a configuration entry's outcome on to its caller as the entry's index."""
    if result.done():
        return
    if done.cancelled():
        result.cancel()
    elif done.exception() is not None:
        result.set_exception(done.exception())  # type: ignore[arg-type]
    else:
        result.set_result(index)


def _link_idle_timeout_seconds(config: NodeConfig) -> float:
    """Twice the longest election timeout: a link silent that long is reported down (peer.down)."""
    longest_election_timeout_seconds = 2 * config.timing.election_timeout_ticks * config.timing.tick_ms / 1000
    return max(1.0, 2 * longest_election_timeout_seconds)
