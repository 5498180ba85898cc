"""Prometheus metrics of one node, kept in a registry of its own.

Each node process (and each test) builds its own ``Metrics`` so that nothing
touches prometheus_client's global registry; ``GET /metrics`` renders exactly
this registry. The HTTP layer records requests, latencies, idempotent
replays, 429s, refused connections and body timeouts; the node driver records replication state and WAL fsyncs through the
``set_*`` / ``observe_*`` methods and issued tokens when it applies them; the
service records detokenize results; the loop watcher (tokenvault/core/loopwatch.py)
records how late the event loop woke it. Label values come from fixed sets (route
templates, roles, peer ids and API key names from the config), never from
request data, so the number of series is bounded. The ``*_created`` series
prometheus_client adds to every counter and histogram (when each was made) are
turned off: about a fifth of the page's lines (48 of 237 on a small one) for
nothing an operator reads, and the page is exactly the series docs/api.md lists
(tests/unit/test_metrics.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               disable_created_metrics, generate_latest)

disable_created_metrics()  # type: ignore[no-untyped-call]  # process-wide, before any metric below is made

ROLES = ("primary", "backup", "candidate")
PROCESS_KINDS = ("node", "core", "worker")
METRICS_CONTENT_TYPE = CONTENT_TYPE_LATEST
UNMATCHED_ROUTE = "unmatched"

# Buckets in seconds, chosen around the latencies this service targets: an
# fsynced tokenize takes milliseconds, a request waiting for a failover seconds.
REQUEST_LATENCY_BUCKETS_SECONDS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
FSYNC_LATENCY_BUCKETS_SECONDS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
)
BATCH_ENTRY_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
BATCH_BYTES_BUCKETS = (256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216)
# Event-loop stalls, in seconds. The question they answer is whether the loop
# ever stops long enough to miss a heartbeat or an election timeout (hundreds of
# milliseconds), so they resolve the range from a timer's own jitter (1 ms) to
# seconds.
LOOP_STALL_BUCKETS_SECONDS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# A shred pass rewrites up to the whole store: a second at a million tokens, about a minute at 50 M on two cores.
SHRED_PASS_BUCKETS_SECONDS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


# How old an exposition GET /metrics may answer: scrapers ask every 10-60 s, and the page needs no key,
# so without a bound each request would cost a rendering (about 6 ms of a node's CPU at W = 2, measured
# in docs/api.md) and a flood of them would take the node's cores. In a node of HTTP workers the page
# is kept twice, by the worker and by the core that merges it, each for half of this.
METRICS_MAX_AGE_SECONDS = 1.0


class RecentRender:
    """One rendering of an exposition shared by every caller within ``max_age_seconds`` of it, and by
    every caller that arrives while it renders: a flood of scrapes costs at most one rendering per
    period. A rendering that fails fails its waiters; the next call renders again."""

    def __init__(self, render: Callable[[], Awaitable[bytes]], max_age_seconds: float = METRICS_MAX_AGE_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._render = render
        self._max_age_seconds = max_age_seconds
        self._clock = clock
        self._text: bytes | None = None
        self._rendered_at = 0.0
        self._pending: asyncio.Future[bytes] | None = None
        self.renderings = 0  # for the tests

    async def get(self) -> bytes:
        if self._text is not None and self._clock() - self._rendered_at < self._max_age_seconds:
            return self._text
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._render_once())
        return await asyncio.shield(self._pending)

    async def _render_once(self) -> bytes:
        started = self._clock()
        try:
            self.renderings += 1
            text = await self._render()
            self._text, self._rendered_at = text, started
            return text
        finally:
            self._pending = None


class Metrics:
    """All metric objects of a node, registered in ``self.registry``."""

    def __init__(self, process: str = "node") -> None:
        """``process`` says which families this registry holds: "node" all of them (a node that is one
        process), "core" all but the HTTP layer's, "worker" the HTTP layer's and the loop watcher's (a
        node of W worker processes; tokenvault.api.core_calls merges them into one exposition)."""
        if process not in PROCESS_KINDS:
            raise ValueError(f"process must be one of {PROCESS_KINDS}")
        self.registry = CollectorRegistry(auto_describe=True)
        # Labelled children per (route, method, status): looking them up through
        # labels() costs a few microseconds on every request. Bounded, since
        # routes, methods and status codes are finite sets.
        self._request_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._current_role: str | None = None
        self._peers: Callable[[], Mapping[str, tuple[bool, int | None]]] | None = None
        if process != "core":
            self._define_http_metrics()
        if process == "worker":
            self._define_worker_read_metrics()
        if process != "worker":
            self._define_service_metrics()
            self._define_replication_metrics()
            self._define_wal_metrics()
        self._define_loop_metrics()

    def _define_http_metrics(self) -> None:
        registry = self.registry
        self.http_requests = Counter(
            "tokenvault_http_requests",
            "HTTP requests answered, by route template, method and status.",
            ("route", "method", "status"),
            registry=registry,
        )
        self.http_request_duration = Histogram(
            "tokenvault_http_request_duration_seconds",
            "Time from receiving a request to having its response ready, by route template and method.",
            ("route", "method"),
            buckets=REQUEST_LATENCY_BUCKETS_SECONDS,
            registry=registry,
        )
        self.rate_limited_requests = Counter(
            "tokenvault_rate_limited_requests",
            "Requests answered 429, by API key name (never the key) and endpoint kind (tokenize, detokenize,"
            " admin); reason is 'rate' for the key's rate limit, 'bodies' for its share of bodies being received.",
            ("key", "kind", "reason"),
            registry=registry,
        )
        self.http_connections_refused = Counter(
            "tokenvault_http_connections_refused",
            "HTTP connections answered 503 and closed at once because max_connections were open.",
            registry=registry,
        )
        self.http_body_timeouts = Counter(
            "tokenvault_http_body_timeouts",
            "Requests whose body stopped arriving for longer than the body timeout (answered 408, closed).",
            registry=registry,
        )
        self.idempotent_replays = Counter(
            "tokenvault_idempotent_replays",
            "Responses served from a stored idempotency record, by endpoint.",
            ("route",),
            registry=registry,
        )

    def _define_service_metrics(self) -> None:
        registry = self.registry
        self.tokens_issued = Counter(
            "tokenvault_tokens_issued",
            "Items of the tokenize entries this node applied while primary: every value a written tokenize"
            " carried, new or not (a value repeated counts each time); a tokenize answered as a read counts none.",
            registry=registry,
        )
        self.tokenize_answered_as_read = Counter(
            "tokenvault_tokenize_answered_as_read",
            "Values of tokenize requests answered without a log entry because every token existed already in the"
            " active epoch (the node that answered records it, after its read barrier or read index).",
            registry=registry,
        )
        self.sealed_values = Counter(
            "tokenvault_sealed_values",
            "Values sealed (token + ciphertext) for tokenize entries, by where: the sealer helper process, the"
            " node's own process, or an HTTP worker process (the service records it).",
            ("where",),
            registry=registry,
        )
        self._sealed_children = {where: self.sealed_values.labels(where=where) for where in ("helper", "node", "worker")}
        self.values_detokenized = Counter(
            "tokenvault_values_detokenized",
            "Tokens looked up by detokenize requests answered by this node, by result (the service records it).",
            ("result",),
            registry=registry,
        )

    def _define_worker_read_metrics(self) -> None:
        """An HTTP worker answers detokenize requests from its own view of the store (docs/architecture.md)."""
        registry = self.registry
        self.values_detokenized = Counter(
            "tokenvault_values_detokenized",
            "Tokens looked up by detokenize requests answered by this node, by result (the service records it).",
            ("result",),
            registry=registry,
        )
        self.worker_store_reads = Counter(
            "tokenvault_worker_store_reads",
            "Detokenize requests by where an HTTP worker answered them: 'view' from its read-only view of the"
            " store, 'core' by the node's core process (a token the view lacks, no view), 'failed' the view"
            " failed after the audit record was written (answered 503).",
            ("result",),
            registry=registry,
        )
        self._worker_read_children = {result: self.worker_store_reads.labels(result=result)
                                      for result in ("view", "core", "failed")}
        self.tokenize_answered_as_read = Counter(
            "tokenvault_tokenize_answered_as_read",
            "Values of tokenize requests answered without a log entry because every token existed already in the"
            " active epoch (the node that answered records it, after its read barrier or read index).",
            registry=registry,
        )
        self.worker_store_view_catch_ups = Gauge(
            "tokenvault_worker_store_view_catch_ups",
            "Times this HTTP worker's view of the store caught up with the core's writes since the worker started"
            " (each costs about a millisecond of the worker's CPU, more when it replays much the core wrote).",
            registry=registry,
        )
        self.worker_store_view_opens = Gauge(
            "tokenvault_worker_store_view_opens",
            "Times this HTTP worker opened its view of the store since it started: the first open, then at most"
            " once per memtable flush of the core (none while a write burst lasts) and once per snapshot install"
            " (the worker's loop waits for each).",
            registry=registry,
        )
        self.worker_store_view_deferred = Gauge(
            "tokenvault_worker_store_view_deferred",
            "Catch-ups of this HTTP worker's view of the store, no request waiting, that left the view where it"
            " was: during a memtable flush of the core, a write burst, or while the flush it asked for begins"
            " (the core answers what the view lacks meanwhile).",
            registry=registry,
        )
        self.worker_store_view_flushes_asked = Gauge(
            "tokenvault_worker_store_view_flushes_asked",
            "Times this HTTP worker asked the core to flush the store's memtable since it started, so that its"
            " view opens on a short WAL file instead of replaying a long one (after a write burst, or at start"
            " during one).",
            registry=registry,
        )
        self.worker_store_view_cache_bytes = Gauge(
            "tokenvault_worker_store_view_cache_bytes",
            "Capacity of this HTTP worker's block cache for its view of the store: the table files' index and"
            " filter blocks plus a fixed share for data blocks, so it grows with the store.",
            registry=registry,
        )

    def record_worker_store_read(self, result: str) -> None:
        self._worker_read_children[result].inc()

    def _define_replication_metrics(self) -> None:
        registry = self.registry
        self.role = Gauge(
            "tokenvault_role", "1 for this node's current role, 0 for the others.", ("role",), registry=registry
        )
        self.view = Gauge("tokenvault_view", "Current view (term) of this node.", registry=registry)
        self.commit_index = Gauge(
            "tokenvault_commit_index", "Highest log index known committed.", registry=registry
        )
        self.applied_index = Gauge(
            "tokenvault_applied_index", "Highest log index applied to the store.", registry=registry
        )
        self.active_epoch = Gauge(
            "tokenvault_active_epoch", "Active token epoch (0 before the first).", registry=registry
        )
        self.certificate_expiry = Gauge(
            "tokenvault_tls_certificate_expiry_timestamp_seconds",
            "When the node's TLS certificate (certificate=node) and the cluster CA's (certificate=ca) stop"
            " being valid, in seconds since the epoch; absent in a plain cluster. Past it, peer links and"
            " clients refuse the handshake.",
            ["certificate"],
            registry=registry,
        )
        self.peer_reachable = Gauge(
            "tokenvault_peer_reachable", "1 when the peer link is connected, else 0.", ("peer",), registry=registry
        )
        self.peer_match_index = Gauge(
            "tokenvault_peer_match_index",
            "Highest log index known replicated on the peer (primary only).",
            ("peer",),
            registry=registry,
        )
        self.backup_lost_entries = Counter(
            "tokenvault_backup_lost_entries",
            "Backups this node, as primary, found refusing log positions they had acknowledged: entries lost"
            " from their disk (replica.backup_lost_entries), by peer.",
            ("peer",),
            registry=registry,
        )
        self.member_below_floor = Counter(
            "tokenvault_member_below_floor",
            "Members whose log this node found ending below their floor (what they acknowledged of the"
            " committed log), so their votes did not count (replica.member_below_floor), by peer.",
            ("peer",),
            registry=registry,
        )
        self.peer_messages_dropped = Counter(
            "tokenvault_peer_messages_dropped",
            "Messages to a peer dropped because its link's send queue was full (peer.send_queue_full), by peer.",
            ("peer",),
            registry=registry,
        )
        for role in ROLES:
            self.role.labels(role=role).set(0)

    def _define_wal_metrics(self) -> None:
        registry = self.registry
        self.store_view_flushes = Counter(
            "tokenvault_store_view_flushes",
            "Memtable flushes the core started because its HTTP workers' views asked after a write burst (at"
            " most one in 10 s): each is one more, smaller, level-0 table file for the store's compactions.",
            registry=registry,
        )
        self.data_disk_free_bytes = Gauge(
            "tokenvault_data_disk_free_bytes",
            "Bytes free to the node on the file system of its data directory (read when scraped). A node"
            " whose disk fills stops with node.fatal (docs/failure-modes.md); a snapshot install needs about"
            " the store's size free.",
            registry=registry,
        )
        self.store_table_bytes = Gauge(
            "tokenvault_store_table_bytes",
            "Bytes of the store's table files (RocksDB's total-sst-files-size, read when scraped).",
            registry=registry,
        )
        self.wal_segment_bytes = Gauge(
            "tokenvault_wal_segment_bytes",
            "Bytes of the replication write-ahead log's segment files (read when scraped).",
            registry=registry,
        )
        self.shred_backlog_rows = Gauge(
            "tokenvault_shred_backlog_rows",
            "Rows deletes left to shred that no shred pass has taken yet (read when scraped); past 100,000"
            " the next pass compacts the whole key space.",
            registry=registry,
        )
        self.shred_oldest_wait_seconds = Gauge(
            "tokenvault_shred_oldest_wait_seconds",
            "Seconds the oldest delete or epoch destroy applied here has waited for a shred pass to erase"
            " it from the store's files (read when scraped); 0 when none waits.",
            registry=registry,
        )
        self.shred_pass_seconds = Histogram(
            "tokenvault_shred_pass_seconds",
            "Duration of one shred pass in the store (its flush and compactions), by what it compacted: the"
            " key ranges of the rows it took (keys) or the whole key space (whole).",
            ("scope",),
            buckets=SHRED_PASS_BUCKETS_SECONDS,
            registry=registry,
        )
        for scope in ("keys", "whole"):  # both series from the start, at 0, so a rate over them is defined
            self.shred_pass_seconds.labels(scope=scope)
        self.wal_fsync_duration = Histogram(
            "tokenvault_wal_fsync_duration_seconds",
            "Duration of one WAL group commit (write plus fsync).",
            buckets=FSYNC_LATENCY_BUCKETS_SECONDS,
            registry=registry,
        )
        self.wal_batch_entries = Histogram(
            "tokenvault_wal_batch_entries",
            "Log entries made durable by one WAL fsync.",
            buckets=BATCH_ENTRY_BUCKETS,
            registry=registry,
        )
        self.wal_batch_bytes = Histogram(
            "tokenvault_wal_batch_bytes",
            "Bytes written by one WAL group commit.",
            buckets=BATCH_BYTES_BUCKETS,
            registry=registry,
        )

    def _define_loop_metrics(self) -> None:
        registry = self.registry
        self.event_loop_stall = Histogram(
            "tokenvault_event_loop_stall_seconds",
            "How late the loop watcher woke up against its timer (the time the event loop was busy elsewhere).",
            buckets=LOOP_STALL_BUCKETS_SECONDS,
            registry=registry,
        )
        self.event_loop_stall_max = Gauge(
            "tokenvault_event_loop_stall_max_seconds",
            "The longest event-loop stall seen over about the last minute.",
            registry=registry,
        )

    # HTTP layer.

    def observe_request(self, route: str, method: str, status: int, duration_seconds: float) -> None:
        children = self._request_children.get((route, method, status))
        if children is None:
            children = (self.http_requests.labels(route=route, method=method, status=str(status)),
                        self.http_request_duration.labels(route=route, method=method))
            self._request_children[(route, method, status)] = children
        children[0].inc()
        children[1].observe(duration_seconds)

    def record_tokens_issued(self, count: int) -> None:
        self.tokens_issued.inc(count)

    def record_tokenize_answered_as_read(self, count: int) -> None:
        self.tokenize_answered_as_read.inc(count)

    def record_sealed(self, where: str, count: int) -> None:
        self._sealed_children[where].inc(count)

    def record_detokenized(self, found: int, unknown: int) -> None:
        self.values_detokenized.labels(result="found").inc(found)
        self.values_detokenized.labels(result="unknown").inc(unknown)

    def record_rate_limited(self, key_name: str, kind: str, reason: str) -> None:
        """A 429; ``key_name`` is a bootstrap key's configured name or "runtime" (so the series are bounded)."""
        self.rate_limited_requests.labels(key=key_name, kind=kind, reason=reason).inc()

    def record_connection_refused(self) -> None:
        self.http_connections_refused.inc()

    def record_body_timeout(self) -> None:
        self.http_body_timeouts.inc()

    def record_replay(self, route: str) -> None:
        self.idempotent_replays.labels(route=route).inc()

    # Node driver.

    def set_role(self, role: str) -> None:
        """Mark ``role`` (one of ROLES) as the current one."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}")
        for name in ROLES:
            self.role.labels(role=name).set(1 if name == role else 0)
        self._current_role = role

    def set_replication(
        self, *, role: str, view: int, commit_index: int, applied_index: int, active_epoch: int
    ) -> None:
        """Set every replication gauge at once (the driver calls this after each Ready)."""
        if role != self._current_role:  # the role gauges change rarely; labels() is not free
            self.set_role(role)
        self.view.set(view)
        self.commit_index.set(commit_index)
        self.applied_index.set(applied_index)
        self.active_epoch.set(active_epoch)

    def record_backup_lost_entries(self, peer: str) -> None:
        self.backup_lost_entries.labels(peer=peer).inc()

    def record_member_below_floor(self, peer: str) -> None:
        self.member_below_floor.labels(peer=peer).inc()

    def record_peer_message_dropped(self, peer: str) -> None:
        self.peer_messages_dropped.labels(peer=peer).inc()

    def set_peer(self, peer: str, *, reachable: bool, match_index: int | None = None) -> None:
        self.peer_reachable.labels(peer=peer).set(1 if reachable else 0)
        if match_index is not None:
            self.peer_match_index.labels(peer=peer).set(match_index)

    def watch_peers(self, peers: Callable[[], Mapping[str, tuple[bool, int | None]]]) -> None:
        """Set the peer gauges from ``peers`` (each peer's link state and, on the primary, its match
        index) whenever the exposition is rendered: a peer gone from it loses its series, and one
        without a match index (this node is not the primary) has no match_index series."""
        self._peers = peers

    def _refresh_peers(self) -> None:
        if self._peers is None:
            return
        states = self._peers()
        self.peer_reachable.clear()  # set afresh: a peer gone, or a match index no longer known, has no series
        self.peer_match_index.clear()
        for peer, (reachable, match_index) in states.items():
            self.set_peer(peer, reachable=reachable, match_index=match_index)

    def watch_disk(self, free_bytes: Callable[[], float], store_bytes: Callable[[], float],
                   wal_bytes: Callable[[], float]) -> None:
        """Read the three disk gauges from these functions whenever the registry is collected; each
        returns NaN when it cannot say (a store being closed, say)."""
        self.data_disk_free_bytes.set_function(free_bytes)
        self.store_table_bytes.set_function(store_bytes)
        self.wal_segment_bytes.set_function(wal_bytes)

    def watch_shred_backlog(self, rows: Callable[[], float], oldest_wait_seconds: Callable[[], float]) -> None:
        """Read the shred backlog gauges from ``rows`` and ``oldest_wait_seconds`` whenever the registry is
        collected."""
        self.shred_backlog_rows.set_function(rows)
        self.shred_oldest_wait_seconds.set_function(oldest_wait_seconds)

    def observe_shred_pass(self, store_seconds: float, whole_store: bool) -> None:
        """One shred pass through the store (tokenvault/core/shred.py)."""
        self.shred_pass_seconds.labels(scope="whole" if whole_store else "keys").observe(store_seconds)

    def observe_wal_sync(self, duration_seconds: float, entries: int, written_bytes: int) -> None:
        """One WAL group commit: its latency, how many entries and bytes it made durable."""
        self.wal_fsync_duration.observe(duration_seconds)
        self.wal_batch_entries.observe(entries)
        self.wal_batch_bytes.observe(written_bytes)

    # Loop watcher.

    def observe_loop_stall(self, stall_seconds: float) -> None:
        """One wake-up of the loop watcher, ``stall_seconds`` after it was due."""
        self.event_loop_stall.observe(stall_seconds)

    def set_loop_stall_max(self, stall_seconds: float) -> None:
        self.event_loop_stall_max.set(stall_seconds)

    # Exposition.

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of this registry and its content type."""
        self._refresh_peers()
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
