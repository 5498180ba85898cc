"""The wiring of one node's process: the core (tokenvault.core.node) and its HTTP API (tokenvault.api).

``tokenvault serve --config FILE`` runs ``main``: it loads the config, starts
the node, the sealer helper and the HTTPS (or HTTP) server, and serves until
SIGTERM/SIGINT or a fatal storage error. The driver itself knows nothing of
HTTP; this module is the only one that imports both sides.
"""

from __future__ import annotations

import asyncio
import gc
import os
import resource
import signal
from pathlib import Path

from tokenvault.api.http import OPEN_FILES_HEADROOM, connections_allowed, create_app, http_server
from tokenvault.api.httpserver import HttpServer
from tokenvault.api.core_calls import CoreCalls
from tokenvault.api.service import NodeService
from tokenvault.api.workers import WorkerPool, WorkerStartError, default_worker_count
from tokenvault.config import ConfigError, NodeConfig, load_config
from tokenvault.core.incarnations import IncarnationError
from tokenvault.core.loopwatch import LoopWatch
from tokenvault.core.node import GC_YOUNG_THRESHOLD, SHUTDOWN_GRACE_SECONDS, Node, fatal_text
from tokenvault.core.sealer import Sealer
from tokenvault.core.store_layout import StoreError
from tokenvault.core.wal_segments import WalCorruption
from tokenvault.core.wal import WalFatal
from tokenvault.crypto.tls import TlsError
from tokenvault.logs import configure_logging, get_logger, log_loop_exceptions
from tokenvault.metrics import Metrics

log = get_logger("node")

# How long the HTTP workers may take to start and listen (a Python start-up each, on a busy machine).
WORKER_START_SECONDS = 30.0
# The soft limit asked for when the hard limit is unlimited (Linux refuses an unlimited soft one).
OPEN_FILES_WHEN_UNLIMITED = 1 << 20


def forbid_core_dumps() -> None:
    """No core file from this process or those it starts (the HTTP workers and the sealer inherit the
    limit): a crash's core would hold the master key and the epoch keys in the core's memory, the derived
    keys in a worker's, on disk, readable by whoever reads the dump directory. A crash still says where
    it happened (enable_crash_stacks)."""
    _, hard = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (0, hard))


def raise_open_files_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit; the HTTP workers and the sealer
    inherit it. Every HTTP connection and every store table file is a descriptor, and many systems
    start a service with a soft limit of 1,024 under a far higher hard one. Returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:  # not on Linux, which bounds it; enough wherever it is so
        return OPEN_FILES_WHEN_UNLIMITED
    target = OPEN_FILES_WHEN_UNLIMITED if hard == resource.RLIM_INFINITY else hard
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass  # the limit stays; the caller compares it with what the node needs
    return soft


async def run_node(config: NodeConfig, config_path: Path | None = None) -> int:
    """Start every part of one node and serve until SIGTERM/SIGINT or a fatal storage error.

    With ``http.workers`` W > 0 (the default: the machine's cores minus one) the HTTP port is served by
    W worker processes (tokenvault.api.worker), started from ``config_path``; this process is the
    node's core. With W = 0, or without a config file to give the workers, it serves HTTP itself."""
    # Everything the node writes (log, WAL, store) is for its owner only, and no core dump holds its keys.
    os.umask(0o077)
    forbid_core_dumps()
    configure_logging(config.node_id, Path(config.log_file) if config.log_file else None, config.log_level)
    log_loop_exceptions(asyncio.get_running_loop())
    open_files, needed = raise_open_files_limit(), config.http.max_connections + OPEN_FILES_HEADROOM
    if open_files < needed:
        log.warning("node.open_files_limit_low", limit=open_files, needed=needed,
                    connections_per_process=connections_allowed(),
                    detail="each process of this node takes fewer HTTP connections than [http] max_connections "
                    "and answers the rest 503; raise the hard limit on open files (ulimit -Hn, systemd "
                    "LimitNOFILE=) or lower max_connections")
    worker_count = default_worker_count() if config.http.workers is None else config.http.workers
    metrics = Metrics("core" if worker_count > 0 and config_path is not None else "node")
    # The signals are taken before anything starts: a SIGHUP (certificate rotation) or a SIGTERM sent while
    # the node recovers or its workers start would otherwise end it unlogged, by the default action. They
    # are handled on the loop, so at the first wait after the node is built (a stop then waits for the
    # start to finish, and shuts the node down as at any time).
    node: Node | None = None
    server: HttpServer | None = None
    pool: WorkerPool | None = None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signal_number, stop.set)

    def reload_tls() -> None:  # SIGHUP: certificate rotation without a restart (docs/security.md)
        # Workers not started yet read the files at their start; those running are told.
        if node is not None and node.reload_tls() and pool is not None:
            pool.push_tls_reload()

    loop.add_signal_handler(signal.SIGHUP, reload_tls)
    try:
        node = Node(config, metrics)
    except (WalCorruption, StoreError, TlsError, IncarnationError) as error:
        log.critical("node.refused_to_start", reason=str(error)[:500])
        return 3
    except OSError as error:  # a data directory the node cannot make, read or write: said in one line
        log.critical("node.refused_to_start", reason=f"{type(error).__name__}: {fatal_text(error)}")
        return 3
    except ConfigError as error:  # the master key's source (config.load_master_key): the caller prints it too
        log.critical("node.refused_to_start", reason=str(error)[:500])
        raise
    if config.tls is None:
        log.warning("node.tls_disabled", detail="plain HTTP and peer links without TLS: API keys, values and "
                    "replicated entries cross the network readable; generate the cluster without "
                    "TOKENVAULT_TLS=false for TLS")
    sealer = await _start_sealer(node) if config.sealer.enabled else None
    service = NodeService(node, sealer)
    await node.start()
    _tune_garbage_collector()
    calls: CoreCalls | None = None
    if worker_count > 0 and config_path is not None:
        calls = CoreCalls(service, metrics, lambda: pool.channels() if pool is not None else [],
                          max_backup_streams=config.http.max_backup_streams, worker_count=worker_count,
                          requests_in_flight=config.http.max_inflight_requests)
        pool = WorkerPool(config_path, worker_count, calls, max_body_bytes=config.limits.max_body_bytes,
                          host=config.http.host, port=config.http.port,
                          max_inflight_requests=config.http.max_inflight_requests)
        node.store.on_api_keys_changed = pool.push_keys
        node.on_keyring_changed = pool.push_epoch
        node.on_store_files_replaced = pool.push_catch_up
        try:
            await pool.start(WORKER_START_SECONDS)
        except WorkerStartError as error:
            log.critical("node.refused_to_start", reason=str(error))
            node.abort_requests()
            await service.close()
            if sealer is not None:
                await sealer.close()
            await node.close()
            return 3
    else:
        server = http_server(create_app(service, config, metrics))
        await server.start(config.http.host, config.http.port, ssl_context=node.http_tls_context)
    stop_task = loop.create_task(stop.wait())
    fatal_task = loop.create_task(node.stopped.wait())
    loop_watch = LoopWatch(metrics).start()
    await asyncio.wait({stop_task, fatal_task}, return_when=asyncio.FIRST_COMPLETED)
    await loop_watch.stop()
    log.info("node.stopping", reason="fatal" if node.fatal_error else "signal")
    # Waiting requests are answered 503 first, so closing the HTTP server does not
    # wait out their request timeouts.
    if pool is not None:
        # Workers answer what they have in flight (the core still serves their calls), then exit.
        await pool.close(SHUTDOWN_GRACE_SECONDS)
    node.abort_requests()
    await service.close()
    if server is not None:
        await server.close(SHUTDOWN_GRACE_SECONDS)
    if calls is not None:
        await calls.close_backups()
    if sealer is not None:
        await sealer.close()
    await node.close()
    log.info("node.stopped")
    return 2 if node.fatal_error or node.close_failed else 0


def _tune_garbage_collector() -> None:
    """Keep full collections off the event loop's critical path.

    Measured on three nodes under 100-value load: the interpreter's full
    (generation 2) collections ran every few seconds, took 20-90 ms each and
    found nothing to free, scanning the long-lived objects of the imported
    libraries and the node's caches. Freezing what exists after start-up
    moves those objects out of every future collection, and a larger
    youngest-generation threshold makes collections rarer; request garbage is
    freed by reference counting, not by the collector.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


async def _start_sealer(node: Node) -> Sealer | None:
    """The helper process that seals large batches, or None (sealing then stays in process)."""
    config = node.config
    try:
        return await Sealer.start(min_values=config.sealer.min_values,
                                  max_pending_values=config.sealer.max_pending_values,
                                  max_value_bytes=config.limits.max_value_bytes,
                                  timeout_seconds=min(2.0, config.timing.request_timeout_ms / 2000))
    except (OSError, asyncio.TimeoutError) as error:
        log.warning("sealer.not_started", reason=type(error).__name__)
        return None


def main(config_path: str) -> int:
    """Console entry point used by ``tokenvault serve``: load the config and run until stopped."""
    config = load_config(Path(config_path))
    try:
        return asyncio.run(run_node(config, Path(config_path)))
    except WalFatal as error:
        log.critical("node.fatal", error=f"{type(error).__name__}: {str(error)[:300]}", task="start")
        return 2
