"""One HTTP worker process of a node:
``python -m tokenvault.api.worker --config F --index I --workers W --fd N --listen-fd L``.

The node's core process starts W of these (tokenvault.api.workers), each with
its own listening socket L on the node's HTTP port (SO_REUSEPORT: the kernel
spreads connections over them; the core makes them all before any worker
starts). A worker does everything that needs no ordering on its own core: TLS, HTTP
parsing, authentication, rate limits, validation and JSON. Every operation is
then one call to the core over the channel on file descriptor N (a Unix socket
the core made; tokenvault.api.remote), except what it can do alone: sealing
the values of a plain tokenize, and answering a detokenize of tokens its
read-only view of the store holds (tokenvault.core.store_reader; the core
still writes the audit record and says how far the view must catch up first).
It starts with no ``TOKENVAULT_*`` variable and never reads the master key or
an epoch secret; the core pushes it the derived token and data keys of the
epochs it can decrypt, as it gives the sealer helper the active one's.

It exits when its core goes away (the channel closes; within a second, after
closing its listening socket so that no new connection lands on it), and on
SIGTERM after answering the requests it has in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import ssl
import sys
import time
from pathlib import Path

from tokenvault.api.channel import Channel, ChannelClosed, max_frame_bytes
from tokenvault.api.http import create_app, http_server
from tokenvault.api.remote import TLS_TOPIC, RemoteService
from tokenvault.config import NodeConfig, load_config
from tokenvault.core.store_files import STORE_DIRECTORY
from tokenvault.core.store_reader import StoreReadError, open_view
from tokenvault.core.loopwatch import LoopWatch
from tokenvault.crypto.tls import TlsError, load_node_tls, reload_http_server_context
from tokenvault.futures import cancel_and_wait
from tokenvault.logs import configure_logging, enable_crash_stacks, get_logger, log_loop_exceptions
from tokenvault.metrics import Metrics

log = get_logger("worker")

EXIT_REFUSED = 3
# How long a worker whose core is gone keeps connections open for answers already written.
ORPHAN_GRACE_SECONDS = 0.1
KEY_TABLE_TIMEOUT_SECONDS = 10.0
# Beside the store in the data directory: each worker's scratch files for its view of the store.
STORE_VIEWS_DIRECTORY = "store-views"
# [http] store_reads absent: the workers read the store themselves from this many workers on.
STORE_READS_MIN_WORKERS = 2
# A view that cannot be opened at start is tried again this often, after 0.5 s, 1 s, 1.5 s.
VIEW_OPEN_ATTEMPTS = 4
VIEW_OPEN_RETRY_SECONDS = 0.5


async def run_worker(config: NodeConfig, index: int, workers: int, channel_fd: int, listen_fd: int) -> int:
    os.umask(0o077)
    configure_logging(config.node_id, Path(config.log_file) if config.log_file else None, config.log_level,
                      process=f"worker-{index}")
    log_loop_exceptions(asyncio.get_running_loop())
    metrics = Metrics("worker")
    service = RemoteService(config.node_id, metrics=metrics,
                            timeout_seconds=config.timing.request_timeout_ms / 1000,
                            max_items=config.limits.max_items)
    try:
        return await _serve(config, index, workers, channel_fd, listen_fd, service, metrics)
    finally:
        if service.view is not None:
            service.view.close()


async def _open_store_view(config: NodeConfig, index: int, workers: int, service: RemoteService) -> None:
    """Open this worker's read-only view of the node's store and have ``service`` read from it; none (every
    detokenize goes to the core) when store reads are off (by default, with fewer than 2 workers) or the
    view cannot be opened. Runs once the worker serves: a worker started during a write burst first
    has the core flush its memtable (tokenvault.core.store_reader.open_view), a second or so."""
    store_reads = config.http.store_reads
    if not (workers >= STORE_READS_MIN_WORKERS if store_reads is None else store_reads):
        return
    scratch = Path(config.data_dir) / STORE_VIEWS_DIRECTORY / f"worker-{index}"
    started = time.monotonic()
    for attempt in range(1, VIEW_OPEN_ATTEMPTS + 1):
        try:
            view = await open_view(Path(config.data_dir) / STORE_DIRECTORY, scratch, service.ask_flush)
        except (StoreReadError, OSError) as error:
            # Reads go to the core meanwhile; a failure that lasts leaves this worker without a view.
            log.warning("worker.store_view_unavailable", error=str(error)[:200], attempt=attempt)
            if attempt < VIEW_OPEN_ATTEMPTS:
                await asyncio.sleep(VIEW_OPEN_RETRY_SECONDS * attempt)
            continue
        service.attach_view(view)
        log.info("worker.store_view_opened", index=index, took_ms=round((time.monotonic() - started) * 1000))
        return


def _reload_tls(config: NodeConfig, context: ssl.SSLContext | None) -> None:
    """Load the node's certificate and key again into this worker's HTTPS context (the core has checked and
    loaded them already; a file replaced again meanwhile is checked here too)."""
    if config.tls is None or context is None:
        return
    try:
        reload_http_server_context(context, config.tls.files(), config.node_id)
    except TlsError as error:
        log.error("worker.tls_reload_failed", reason=str(error)[:300],
                  detail="this worker goes on with the files it had")
        return
    log.info("worker.tls_reloaded")


async def _serve(config: NodeConfig, index: int, workers: int, channel_fd: int, listen_fd: int,
                 service: RemoteService, metrics: Metrics) -> int:
    reader, writer = await asyncio.open_unix_connection(sock=socket.socket(fileno=channel_fd))

    async def render_metrics(arguments: dict[str, object]) -> str:
        view = service.view
        if view is not None:
            metrics.worker_store_view_catch_ups.set(view.catch_ups)
            metrics.worker_store_view_opens.set(view.opens)
            metrics.worker_store_view_deferred.set(view.deferred)
            metrics.worker_store_view_flushes_asked.set(view.flushes_asked)
            metrics.worker_store_view_cache_bytes.set(view.cache_bytes)
        return metrics.render()[0].decode("utf-8")

    tls_context: ssl.SSLContext | None = None

    def on_push(topic: str, payload: object) -> None:
        if topic == TLS_TOPIC:
            _reload_tls(config, tls_context)
            return
        service.on_push(topic, payload)

    channel = Channel(reader, writer, handlers={"metrics": render_metrics}, on_push=on_push,
                      max_frame_bytes=max_frame_bytes(config.limits.max_body_bytes, config.limits.max_items,
                                                      config.limits.max_value_bytes),
                      name=f"worker-{index}").start()
    service.channel = channel
    try:
        tls_context = load_node_tls(config.tls.files(), config.node_id).http_server if config.tls is not None else None
    except TlsError as error:
        log.critical("worker.refused_to_start", reason=str(error)[:300])
        return EXIT_REFUSED
    # The key table first, so a runtime key is never refused for want of it.
    waited = asyncio.ensure_future(service.keys_ready.wait())
    closed = asyncio.ensure_future(channel.closed.wait())
    await asyncio.wait({waited, closed}, timeout=KEY_TABLE_TIMEOUT_SECONDS, return_when=asyncio.FIRST_COMPLETED)
    waited.cancel()
    closed.cancel()
    if channel.closed.is_set():  # the core died while this worker started: nothing to serve for
        log.warning("worker.core_gone", index=index)
        return 0
    if not service.keys_ready.is_set():
        log.critical("worker.refused_to_start", reason="no key table from the core")
        return EXIT_REFUSED
    app = create_app(service, config, metrics, share=workers, node_metrics=service.metrics_text)
    server = http_server(app)
    try:
        # The core made this worker's listening socket on the node's port (tokenvault.api.workers).
        await server.start_on_socket(socket.socket(fileno=listen_fd), ssl_context=tls_context)
    except OSError as error:
        log.critical("worker.refused_to_start", reason=f"cannot serve the listening socket: {error.strerror}")
        await server.close(0)
        return EXIT_REFUSED
    try:
        channel.push("ready", {"pid": os.getpid()})
    except ChannelClosed:  # the core died meanwhile
        log.warning("worker.core_gone", index=index)
        await server.close(0)
        return 0
    log.info("worker.started", index=index, pid=os.getpid())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    opening = loop.create_task(_open_store_view(config, index, workers, service))
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signal_number, stop.set)
    loop_watch = LoopWatch(metrics).start()
    stop_task = loop.create_task(stop.wait())
    gone_task = loop.create_task(channel.closed.wait())
    await asyncio.wait({stop_task, gone_task}, return_when=asyncio.FIRST_COMPLETED)
    await cancel_and_wait([opening])
    await loop_watch.stop()
    if channel.closed.is_set():
        log.warning("worker.core_gone", index=index)
        server.stop_listening()  # no new connection lands here while the process winds down
        await asyncio.sleep(ORPHAN_GRACE_SECONDS)
        return 0
    await server.close(config.timing.request_timeout_ms / 1000)
    await channel.close()
    log.info("worker.stopped", index=index)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenvault.api.worker")
    parser.add_argument("--config", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--listen-fd", type=int, required=True)
    args = parser.parse_args(argv)
    enable_crash_stacks()  # as `tokenvault serve` does
    config = load_config(Path(args.config))
    import uvloop

    uvloop.install()  # as `tokenvault serve` does for the core
    return asyncio.run(run_worker(config, args.index, args.workers, args.fd, args.listen_fd))


if __name__ == "__main__":
    sys.exit(main())
