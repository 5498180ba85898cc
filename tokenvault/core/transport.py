"""Peer transport: one authenticated connection per pair of vault nodes.

The node with the smaller id dials, the other accepts, and the connection then
carries frames both ways. Authentication happens in this order, and nothing a
peer sends before it is complete can cost more than a little memory (at most
1 KiB of frame is decoded; what the socket's stream reader takes ahead on its
own stays under twice READ_CHUNK_BYTES, 512 KiB, per connection, and at most
``max_unauthenticated_connections`` connections are unauthenticated):

1. The acceptor counts the connection as unauthenticated; past
   ``max_unauthenticated_connections`` at once, new ones are closed at once.
2. The acceptor writes a short greeting; the dialer waits for it before it
   speaks, so that the acceptor can hand the socket to TLS before any byte of
   the dialer's arrives (bytes read before the switch would be lost to TLS).
3. With TLS (the default for generated clusters), mutual TLS 1.3: both sides
   present a certificate signed by the cluster CA. The dialer checks that the
   acceptor's certificate names the peer it dialled and no other member; the
   acceptor takes the dialer's node id from its certificate, which must name
   exactly one (a certificate of several would let its holder pose as each of
   them). TLS then protects every frame of the
   connection (confidentiality and integrity), so a relayed handshake gains an
   attacker nothing.
4. Both sides prove they hold the cluster secret with an HMAC over the other
   side's random nonce (a second factor under TLS; the only one in a plain
   cluster), and the id in the Hello must be the one the certificate names.
   The proof also covers the incarnation and the replicated-state settings the
   prover's Hello gave; a member in another incarnation, or with settings
   other than this node's, is refused once it has proved itself.
   Handshake frames are read one at a time with exact reads through a decoder
   limited to ``HANDSHAKE_MAX_FRAME_BYTES``: a larger length prefix is refused
   before any of its body is read.

A failed handshake is logged with the remote address and closes only that
connection; a frame that fails to decode later closes that one connection too.

Replication messages are fire-and-forget: the replication core tolerates loss,
so a full send queue drops the newest message instead of blocking the driver.
A link's queue is full at SEND_QUEUE_MAX_MESSAGES frames, or once it and the bytes
written to the socket's transport that the kernel has not taken reach
SEND_QUEUE_MAX_BYTES (a frame larger than the byte bound still goes alone into an
empty link):
a peer that stops reading costs its link at most that much memory, whatever the
frames hold. Each drop is reported (``on_dropped``: the node counts it in a metric)
and logged as ``peer.send_queue_full``, summed over a second per peer and limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import os
import time
from collections.abc import Callable, Coroutine
from typing import Any
from dataclasses import dataclass

from protocol import (FrameDecoder, Hello, HelloProof, HelloRefused, Message, Ping, ProtocolError, ReplicatedSettings,
                      encode_frame)
from protocol.codec import LENGTH_PREFIX_BYTES, decode_settings
from tokenvault.futures import cancel_and_wait
from tokenvault.logs import SummedEvent, get_logger
from tokenvault.core.incarnations import INCARNATION_BYTES
from tokenvault.crypto.tls import PeerTlsContexts, peer_node_ids

HANDSHAKE_TIMEOUT_SECONDS = 3.0
# peer.incarnation_changed is said once per member and incarnation, peer.settings_differ once per member and
# settings, peer.refused_this_node once per peer, for at most this many of them.
MAX_INCARNATIONS_REFUSED_LOGGED = 64
REFUSAL_REASON_MAX_CHARS = 400
# A HelloProof is under 100 bytes, a Hello under 700 with the most settings the codec allows (MAX_SETTINGS);
# nothing larger is read from a peer not yet authenticated.
HANDSHAKE_MAX_FRAME_BYTES = 1024
DEFAULT_MAX_UNAUTHENTICATED_CONNECTIONS = 8
# Sent by the acceptor first; the version lets nodes of different versions refuse each other cleanly
# rather than link and fail on a frame or a log entry one of them cannot decode. 2: the Hello carries
# the incarnation. 3: a tokenize entry may carry an expiry per item. 4: a backup forwards a worker-sealed
# tokenize with a format, a TTL or metadata as ``tokenize.sealed.v2``. 5: a heartbeat carries the members'
# floors, a vote reply the voter's last index (protocol/messages.py). 6: a read-index reply says whether
# the primary refused the read for a full queue (``overloaded``). 7: a configuration entry (and a snapshot's
# configuration) gives each member its ``since`` (protocol/membership.py, format 2). 8: a poll and a vote
# request carry the candidate's ``since``, an append a sequence number its reply echoes, a heartbeat the
# primary's own commit index and its reply the backup's last index (protocol/messages.py). 9: a re-tokenize's
# tokenize entry may say that it carries each mapping's life (``carries_lives``, a 14th field;
# tokenvault/core/commands.py), which a node of version 8 refuses to decode. 10: the Hello carries the sender's
# replicated-state settings (``settings``), which its proof covers.
PEER_PROTOCOL_VERSION = 10
GREETING_PREFIX = b"TVPEER"
GREETING = GREETING_PREFIX + b"%d\n" % PEER_PROTOCOL_VERSION
# A greeting is read up to its newline, at most this long: versions differ in their number of digits (9 and 10),
# and a dialer that read as many bytes as its own greeting has would wait, for a shorter one, on a byte
# that never comes, and fail by timeout instead of as PeerVersionMismatch.
GREETING_MAX_BYTES = len(GREETING_PREFIX) + 20
NONCE_BYTES = 32
SEND_QUEUE_MAX_MESSAGES = 4096
# A forwarded request's body may be 8 MiB and an append 4 MiB and more: frames alone would let a peer
# that does not read hold gigabytes here. 64 MiB is half a second of a 1 Gbit/s link.
SEND_QUEUE_MAX_BYTES = 64 * 1024 * 1024
# Queued frames coalesced into one socket write, to save syscalls.
FRAMES_PER_WRITE = 512
# And at most about this many bytes (a larger frame goes alone). On a TLS link the transport counts only what
# it has not encrypted yet: what it encrypted sits in the socket transport beneath it, uncounted, until that
# one's flow control pauses it. One write at a time of at most this much keeps that part near this bound (plus
# the socket transport's 64 KiB high-water mark), not up to the whole queue.
WRITE_BYTES_MAX = 1 << 20
RECONNECT_DELAY_SECONDS_MIN = 0.05
RECONNECT_DELAY_SECONDS_MAX = 1.0
READ_CHUNK_BYTES = 256 * 1024
# peer.connection_refused and peer.handshake_failed (the accepting side): at most one line per interval
# for each remote host and reason, with the count, since a stranger can open thousands of connections a
# second (tokenvault.logs.SummedEvent).
FLOOD_LOG_INTERVAL_SECONDS = 1.0
# A link that carries nothing for this long is declared down and closed; each
# side sends a Ping after a quarter of it of its own silence, so only a peer
# (or a network) that really went quiet trips it.
DEFAULT_IDLE_TIMEOUT_SECONDS = 4.0

log = get_logger("transport")


@dataclass(frozen=True, slots=True)
class PeerAddress:
    node_id: str
    host: str
    port: int


def _proof(secret: bytes, nonce: bytes, prover_id: str, verifier_id: str, prover_incarnation: bytes,
           prover_settings: ReplicatedSettings) -> bytes:
    """The MAC that shows the prover holds the cluster secret, bound to both ids, the nonce and the
    incarnation and settings the prover's Hello gave (so that no one without the secret can present a
    member's Hello with other settings). The incarnation has a fixed length and a setting's name holds
    neither ``=`` nor NUL (protocol.codec.SETTING_NAME), so the message reads back one way only."""
    settings = b"\x00".join(f"{name}={value}".encode() for name, value in prover_settings)
    message = (b"tokenvault/peer-handshake\x00" + prover_id.encode() + b"\x00" + verifier_id.encode() + b"\x00"
               + nonce + b"\x00" + prover_incarnation + b"\x00" + settings)
    return hmac.new(secret, message, hashlib.sha256).digest()


class HandshakeError(Exception):
    """The other side did not prove it belongs to this cluster."""


class PeerVersionMismatch(HandshakeError):
    """The acceptor greets as a vault peer of another protocol version: the two nodes run different
    versions of TokenVault, which do not link (every node of a cluster runs one version)."""


class IncarnationChanged(HandshakeError):
    """A member came back in another life of its data directory (tokenvault/core/incarnations.py)."""


class SettingsDiffer(HandshakeError):
    """A member proved the cluster secret with replicated-state settings other than this node's: the two
    would apply the same log to different states (docs/configuration.md, what every node must share)."""


class RefusedByPeer(Exception):
    """The other side refused this node (HelloRefused), and said why."""


# What a member in another incarnation is told (HelloRefused), and logs as peer.refused_this_node.
INCARNATION_REFUSAL = ("this node's data directory is not the one it had when the peer last saw it (started empty, or "
                       "on another disk): it forgot what it acknowledged and must not vote; replace it with a new "
                       "member (run_cluster.sh add-node, then remove-node of this one; docs/failure-modes.md)")


# What peer.settings_differ says besides the setting and both values.
SETTINGS_DIFFER_DETAIL = ("every node of a cluster must have the same replicated-state settings, or they apply the "
                          "same log to different states, so this link is refused; to change one, stop every node, "
                          "give every node's config the same value, then start them (docs/configuration.md)")


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close at once, without a TLS close_notify exchange.

    A graceful TLS close waits (up to 30 s) for the other side's close_notify;
    a silent link or a hostile stranger would hold the socket that long, after
    it stopped counting as unauthenticated. Frames are fire-and-forget, so
    nothing is lost that the protocol needs.
    """
    writer.transport.abort()


def _remote_address(writer: asyncio.StreamWriter) -> str:
    """host:port of the other end, for logs (the address only: nothing the peer chose to send)."""
    peername = writer.get_extra_info("peername")
    if isinstance(peername, tuple) and len(peername) >= 2:
        return f"{peername[0]}:{peername[1]}"
    return "unknown"


def _host(remote: str) -> str:
    """The host of a ``_remote_address`` (its port dropped: each new connection has another)."""
    return remote.rsplit(":", 1)[0] if ":" in remote else remote


async def _read_greeting(reader: asyncio.StreamReader) -> bytes:
    """The acceptor's greeting: its bytes up to and with its newline, or GREETING_MAX_BYTES of them. Read a
    byte at a time past the shortest greeting, so that nothing after the newline (the start of TLS) is taken."""
    greeting = await reader.readexactly(len(GREETING_PREFIX) + 2)  # the prefix, one digit and the newline
    # Not a vault's greeting at all: refused at once, not after waiting on bytes such a server may never send.
    while greeting.startswith(GREETING_PREFIX) and not greeting.endswith(b"\n") and len(greeting) < GREETING_MAX_BYTES:
        greeting += await reader.readexactly(1)
    return greeting


async def _read_handshake_frame(reader: asyncio.StreamReader, decoder: FrameDecoder) -> object:
    """Exactly one frame, read exactly: the length is checked (by the small decoder) before the body is read.

    Exact reads also leave every byte after the handshake in the stream for the connection's own decoder.
    """
    prefix = await reader.readexactly(LENGTH_PREFIX_BYTES)
    decoder.feed(prefix)  # raises ProtocolError for a length over the handshake limit
    messages = decoder.feed(await reader.readexactly(int.from_bytes(prefix, "big")))
    if len(messages) != 1:
        raise HandshakeError("a handshake frame did not decode to one message")
    return messages[0]


class _Connection:
    """One established, authenticated connection to a peer, with a bounded send queue."""

    def __init__(self, peer_id: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 decoder: FrameDecoder) -> None:
        self.peer_id = peer_id
        self.reader = reader
        self.writer = writer
        self.decoder = decoder
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=SEND_QUEUE_MAX_MESSAGES)
        self.queued_bytes = 0  # of the frames in ``queue``
        self.silent = False

    def enqueue(self, frame: bytes) -> str | None:
        """Queue ``frame``: None, or the bound that refused it (``messages`` or ``bytes``).

        The byte bound counts the transport's buffer too (``backlog_bytes``): the writer moves queued frames
        there, and a peer that stops reading leaves them there, so a bound on the queue alone let the link
        hold twice SEND_QUEUE_MAX_BYTES."""
        if self.queue.full():
            return "messages"
        backlog = self.backlog_bytes()
        if backlog and backlog + len(frame) > SEND_QUEUE_MAX_BYTES:
            return "bytes"
        self.queue.put_nowait(frame)
        self.queued_bytes += len(frame)
        return None

    def backlog_bytes(self) -> int:
        """Bytes given to this link that have not reached the kernel: queued frames and the transport's buffer."""
        return self.queued_bytes + self.writer.transport.get_write_buffer_size()

    def flush(self) -> None:
        """Write what is queued to the socket now, in one write, unless the socket holds bytes back.

        The writer task does the same at its next turn; the driver calls this (PeerTransport.flush)
        before an fsync that holds the loop, so that the primary's appends are in the kernel while
        its own disk write runs. Only an empty transport buffer allows it, so order is kept and
        what the transport buffers stays bounded as with the writer task: once the socket stops
        taking bytes, frames wait in the bounded queue.
        """
        if not self.queue.empty() and self.writer.transport.get_write_buffer_size() == 0:
            self._write_queued([])

    def _write_queued(self, frames: list[bytes]) -> bool:
        """Write ``frames`` and whatever else is queued (up to FRAMES_PER_WRITE frames and WRITE_BYTES_MAX
        bytes) in one write; False if the socket is gone (then it is aborted, and the read side reports the
        peer down)."""
        size = sum(len(frame) for frame in frames)
        while not self.queue.empty() and len(frames) < FRAMES_PER_WRITE and size < WRITE_BYTES_MAX:
            frame = self.queue.get_nowait()
            frames.append(frame)
            size += len(frame)
        data = b"".join(frames)
        self.queued_bytes -= len(data)  # every frame came from the queue
        try:
            self.writer.write(data)
        except (OSError, RuntimeError):
            _abort(self.writer)
            return False
        return True

    async def write_loop(self) -> None:
        while True:
            if not self._write_queued([await self.queue.get()]):
                return
            try:
                await self.writer.drain()
            except (OSError, RuntimeError):
                _abort(self.writer)
                return

    def close(self) -> None:
        _abort(self.writer)


class PeerTransport:
    """Keeps a connection to every peer and hands inbound messages to ``on_message``.

    ``tls`` (the node's peer-link contexts from tokenvault.crypto.tls) makes every link
    mutual TLS; without it links are plain TCP authenticated by the cluster
    secret alone (a development cluster made with TOKENVAULT_TLS=false).
    """

    def __init__(self, node_id: str, listen_host: str, listen_port: int, peers: list[PeerAddress],
                 cluster_secret: bytes, on_message: Callable[[str, object], None],
                 max_frame_bytes: int, on_peer_down: Callable[[str], None] | None = None,
                 idle_timeout_seconds: float = DEFAULT_IDLE_TIMEOUT_SECONDS, *,
                 tls: PeerTlsContexts | None = None,
                 max_unauthenticated_connections: int = DEFAULT_MAX_UNAUTHENTICATED_CONNECTIONS,
                 handshake_timeout_seconds: float = HANDSHAKE_TIMEOUT_SECONDS,
                 incarnation: bytes | None = None, admit: Callable[[str, bytes], bool] | None = None,
                 on_dropped: Callable[[str], None] | None = None, settings: ReplicatedSettings = ()) -> None:
        """``incarnation``: this node's (random when not given); ``admit(member, incarnation)``: whether a
        member that proved the cluster secret is in the incarnation this node knows (None: every one is);
        ``on_dropped(peer)``: called for each message a full link refused; ``settings``: this node's
        replicated-state settings (NodeConfig.replicated_settings), sorted by name: a peer whose Hello gives
        others is refused."""
        if max_unauthenticated_connections < 1:
            raise ValueError("max_unauthenticated_connections must be at least 1")
        if handshake_timeout_seconds <= 0:
            raise ValueError("handshake_timeout_seconds must be positive")
        self.node_id = node_id
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.peers = {peer.node_id: peer for peer in peers if peer.node_id != node_id}
        self._secret = cluster_secret
        self._on_message = on_message
        self._on_peer_down = on_peer_down
        self._idle_timeout_seconds = idle_timeout_seconds
        self._max_frame_bytes = max_frame_bytes
        self._tls = tls
        self._max_unauthenticated_connections = max_unauthenticated_connections
        self._handshake_timeout_seconds = handshake_timeout_seconds
        self._incarnation = incarnation if incarnation is not None else os.urandom(INCARNATION_BYTES)
        if len(self._incarnation) != INCARNATION_BYTES:
            raise ValueError(f"an incarnation is {INCARNATION_BYTES} bytes")
        self._admit = admit
        self._incarnations_refused: set[tuple[str, bytes]] = set()
        try:
            self._settings = decode_settings([[name, value] for name, value in settings])
        except ProtocolError as error:  # what a peer would refuse to decode
            raise ValueError(f"settings: {error}") from None
        self._settings_refused: set[tuple[str, ReplicatedSettings]] = set()
        self._refused_by: set[str] = set()
        self._connections: dict[str, _Connection] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.AbstractServer | None = None
        self._closing = False
        self._started = False
        self.last_seen_monotonic: dict[str, float] = {}
        self.handshake_failures = 0
        self._handshake_failure_log = SummedEvent(log, "peer.handshake_failed", ("remote", "reason"),
                                                  FLOOD_LOG_INTERVAL_SECONDS, level="warning")
        self._refusal_log = SummedEvent(log, "peer.connection_refused", ("remote", "reason", "limit"),
                                        FLOOD_LOG_INTERVAL_SECONDS, level="warning")
        self._on_dropped = on_dropped
        self._drop_log = SummedEvent(log, "peer.send_queue_full", ("peer", "limit"), FLOOD_LOG_INTERVAL_SECONDS,
                                     level="warning")
        self._oversize_log = SummedEvent(log, "peer.frame_too_large", ("peer",), FLOOD_LOG_INTERVAL_SECONDS,
                                         level="error")
        self.frames_rejected = 0
        self.unauthenticated_connections = 0
        self.connections_refused = 0

    # ----------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.listen_host, self.listen_port,
                                                  limit=READ_CHUNK_BYTES)
        self._started = True
        for peer_id in self.peers:
            if self.node_id < peer_id:
                self._spawn(self._dial_forever(self.peers[peer_id]))

    def set_peers(self, peers: list[PeerAddress]) -> None:
        """Follow a membership change: links to new members are made (the lower id dials, as at start),
        links to members that left are closed and no longer accepted. A member whose address changed
        is redialled at the new one."""
        wanted = {peer.node_id: peer for peer in peers if peer.node_id != self.node_id}
        for peer_id in list(self.peers):
            if wanted.get(peer_id) != self.peers[peer_id]:
                del self.peers[peer_id]  # its dialer sees this and stops
                connection = self._connections.get(peer_id)
                if connection is not None:
                    connection.close()
                log.info("peer.removed", peer=peer_id)
        for peer_id, peer in wanted.items():
            if peer_id in self.peers:
                continue
            self.peers[peer_id] = peer
            log.info("peer.added", peer=peer_id, remote=f"{peer.host}:{peer.port}")
            if self._started and not self._closing and self.node_id < peer_id:
                self._spawn(self._dial_forever(peer))

    async def close(self) -> None:
        self._closing = True
        if self._server is not None:
            self._server.close()
        for connection in list(self._connections.values()):
            connection.close()
        await cancel_and_wait(list(self._tasks))
        self._handshake_failure_log.flush()
        self._refusal_log.flush()
        self._drop_log.flush()

    def _spawn(self, coroutine: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ----------------------------------------------------------------- sending
    def send(self, peer_id: str, message: Message) -> bool:
        """Queue a message for a peer; False when there is no connection or its queue is full (a drop,
        reported and logged)."""
        connection = self._connections.get(peer_id)
        if connection is None:
            return False
        frame = encode_frame(message)
        if len(frame) > self._max_frame_bytes:
            # The peer would refuse it as a bad frame and close the link, taking replication down with it:
            # never sent (the callers check sizes first; this is the last guard), reported and counted.
            self._oversize_log.add(1, peer_id)
            if self._on_dropped is not None:
                self._on_dropped(peer_id)
            return False
        refused_by = connection.enqueue(frame)
        if refused_by is None:
            return True
        self._drop_log.add(1, peer_id, refused_by)
        if self._on_dropped is not None:
            self._on_dropped(peer_id)
        return False

    def flush(self) -> None:
        """Write every connection's queued frames to its socket now (_Connection.flush)."""
        for connection in self._connections.values():
            connection.flush()

    def is_connected(self, peer_id: str) -> bool:
        return peer_id in self._connections

    def backlog_bytes(self, peer_id: str) -> int:
        """Bytes queued for ``peer_id`` that have not reached the kernel yet (0 without a connection)."""
        connection = self._connections.get(peer_id)
        return 0 if connection is None else connection.backlog_bytes()

    # ----------------------------------------------------------------- dialing
    async def _dial_forever(self, peer: PeerAddress) -> None:
        """Keep one connection to ``peer`` up for as long as the transport runs.

        Nothing a peer or the network does may end this task: every failure of
        one attempt is logged by type and followed by a capped backoff. The
        backoff also follows every link that ends: it starts again from the
        shortest delay only after a healthy link (see ``_dial_once``), so a
        peer that refuses this node after the handshake (HelloRefused) or
        whose links die at once on a bad frame is not redialled in a tight
        loop (before 2026-12-07 such a link was followed by no sleep at all:
        1,533 full handshakes a second, each logging peer.up and peer.down).
        """
        delay = RECONNECT_DELAY_SECONDS_MIN
        while not self._closing and self.peers.get(peer.node_id) is peer:
            try:
                healthy = await self._dial_once(peer)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # a reset mid-handshake raises RuntimeError, OSError, ssl.SSLError, ...
                self.handshake_failures += 1
                log.warning("peer.handshake_failed", peer=peer.node_id, remote=f"{peer.host}:{peer.port}",
                            reason=type(error).__name__)
                healthy = False
            if healthy:
                delay = RECONNECT_DELAY_SECONDS_MIN
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_DELAY_SECONDS_MAX)

    async def _dial_once(self, peer: PeerAddress) -> bool:
        """One connection attempt; returns once it failed or its link ended.

        True when the link was healthy: it lived at least
        RECONNECT_DELAY_SECONDS_MAX. False when no link was made, or the link
        was refused or died sooner (a bad frame, even after good ones, a reset):
        a link that dies on its first large frame is redialled with a growing
        delay too, not every 50 ms.
        """
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(peer.host, peer.port, limit=READ_CHUNK_BYTES),
                self._handshake_timeout_seconds)
        except (OSError, asyncio.TimeoutError):
            return False
        try:
            await asyncio.wait_for(self._authenticate_as_dialer(peer, reader, writer),
                                   self._handshake_timeout_seconds)
        except BaseException:
            _abort(writer)
            raise
        if self.peers.get(peer.node_id) is not peer:
            _abort(writer)  # it left, or moved, while the handshake ran (set_peers): not linked
            return False
        established = time.monotonic()
        await self._serve_connection(_Connection(peer.node_id, reader, writer, FrameDecoder(self._max_frame_bytes)))
        return time.monotonic() - established >= RECONNECT_DELAY_SECONDS_MAX

    async def _authenticate_as_dialer(self, peer: PeerAddress, reader: asyncio.StreamReader,
                                      writer: asyncio.StreamWriter) -> None:
        greeting = await _read_greeting(reader)
        if greeting != GREETING:
            if greeting.startswith(GREETING_PREFIX):
                raise PeerVersionMismatch("the acceptor runs another peer protocol version")
            raise HandshakeError("the acceptor did not greet as a vault peer")
        if self._tls is not None:
            # Verifies the chain up to the cluster CA and the address dialled (an IP or DNS name in the SANs).
            await writer.start_tls(self._tls.client, server_hostname=peer.host)
            if set(peer_node_ids(writer.get_extra_info("peercert"))) != {peer.node_id}:
                raise HandshakeError("the acceptor's certificate does not name the peer dialled, and it alone")
        decoder = FrameDecoder(HANDSHAKE_MAX_FRAME_BYTES)
        my_nonce = os.urandom(NONCE_BYTES)
        writer.write(encode_frame(Hello(node_id=self.node_id, nonce=my_nonce, incarnation=self._incarnation,
                                        settings=self._settings)))
        await writer.drain()
        hello = await _read_handshake_frame(reader, decoder)
        proof = await _read_handshake_frame(reader, decoder)
        if not isinstance(hello, Hello) or not isinstance(proof, HelloProof) or hello.node_id != peer.node_id:
            raise HandshakeError("unexpected handshake frames")
        if len(hello.nonce) != NONCE_BYTES or len(hello.incarnation) != INCARNATION_BYTES:
            raise HandshakeError("bad nonce or incarnation")  # a short nonce would weaken our proof
        expected = _proof(self._secret, my_nonce, peer.node_id, self.node_id, hello.incarnation, hello.settings)
        if not hmac.compare_digest(expected, proof.mac):
            raise HandshakeError("peer failed to prove the cluster secret")
        our_proof = encode_frame(HelloProof(node_id=self.node_id, mac=_proof(
            self._secret, hello.nonce, self.node_id, peer.node_id, self._incarnation, self._settings)))
        try:
            self._check_incarnation(peer.node_id, hello.incarnation)
        except IncarnationChanged:
            # Our proof first, so that the acceptor takes the refusal from a member, not from anyone.
            await self._send_refusal(writer, our_proof)
            raise
        try:
            self._check_settings(peer.node_id, hello.settings)
        except SettingsDiffer:
            # Our proof still goes: with it the acceptor knows our settings are a member's, and refuses the
            # link and says why on its side too (no HelloRefused is needed: each side holds both settings).
            await self._send_before_abort(writer, our_proof)
            raise
        writer.write(our_proof)
        await writer.drain()

    # ----------------------------------------------------------------- accepting
    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        remote = _remote_address(writer)
        if self.unauthenticated_connections >= self._max_unauthenticated_connections:
            self._refuse(remote)
            _abort(writer)
            return
        self.unauthenticated_connections += 1
        try:
            peer_id = await asyncio.wait_for(self._authenticate_as_acceptor(reader, writer),
                                             self._handshake_timeout_seconds)
        except asyncio.CancelledError:
            _abort(writer)
            raise
        except Exception as error:  # whatever a hostile or dying peer causes ends only this connection
            self.handshake_failures += 1
            self._handshake_failure_log.add(1, _host(remote), type(error).__name__)
            _abort(writer)
            return
        finally:
            self.unauthenticated_connections -= 1
        if peer_id not in self.peers:
            _abort(writer)  # it left while the handshake ran (set_peers): accepted no more
            return
        await self._serve_connection(_Connection(peer_id, reader, writer, FrameDecoder(self._max_frame_bytes)))

    def _refuse(self, remote: str) -> None:
        """Count a connection closed for the unauthenticated cap, and log it (summed, by host)."""
        self.connections_refused += 1
        self._refusal_log.add(1, _host(remote), "too_many_unauthenticated", self._max_unauthenticated_connections)

    async def _authenticate_as_acceptor(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str:
        """The dialer's node id once it has proved itself; raises on anything else."""
        # No await between this write and start_tls: the dialer's first TLS byte must reach the TLS layer.
        writer.write(GREETING)
        certified: tuple[str, ...] | None = None
        if self._tls is not None:
            await writer.start_tls(self._tls.server)
            certified = peer_node_ids(writer.get_extra_info("peercert"))
        decoder = FrameDecoder(HANDSHAKE_MAX_FRAME_BYTES)
        hello = await _read_handshake_frame(reader, decoder)
        if not isinstance(hello, Hello) or hello.node_id not in self.peers or not hello.node_id < self.node_id:
            raise HandshakeError("unknown peer or wrong dialing direction")
        if certified is not None and set(certified) != {hello.node_id}:
            # A certificate naming several members would let whoever holds its key claim each of them.
            raise HandshakeError("the dialer's certificate does not name the member it claims to be, and it alone")
        if len(hello.nonce) != NONCE_BYTES or len(hello.incarnation) != INCARNATION_BYTES:
            raise HandshakeError("bad nonce or incarnation")
        my_nonce = os.urandom(NONCE_BYTES)
        writer.write(encode_frame(Hello(node_id=self.node_id, nonce=my_nonce, incarnation=self._incarnation,
                                        settings=self._settings))
                     + encode_frame(HelloProof(node_id=self.node_id, mac=_proof(
                         self._secret, hello.nonce, self.node_id, hello.node_id, self._incarnation, self._settings))))
        await writer.drain()
        # The dialer sends nothing after Hello until it has our proof, so the next frame must be its proof.
        proof = await _read_handshake_frame(reader, decoder)
        expected = _proof(self._secret, my_nonce, hello.node_id, self.node_id, hello.incarnation, hello.settings)
        if not isinstance(proof, HelloProof) or not hmac.compare_digest(expected, proof.mac):
            raise HandshakeError("peer failed to prove the cluster secret")
        try:
            self._check_incarnation(hello.node_id, hello.incarnation)
        except IncarnationChanged:
            await self._send_refusal(writer)
            raise
        self._check_settings(hello.node_id, hello.settings)  # the dialer checked ours and says so itself
        return hello.node_id

    async def _send_refusal(self, writer: asyncio.StreamWriter, before: bytes = b"") -> None:
        """Tell a member refused for its incarnation why, once this side has proved itself (``before``: a
        dialer's proof), and wait until that has left this process (the connection is aborted next, which
        would drop what is still buffered). The other side reads it as its first frame after the handshake,
        from an authenticated peer."""
        await self._send_before_abort(
            writer, before + encode_frame(HelloRefused(node_id=self.node_id, reason=INCARNATION_REFUSAL)))

    @staticmethod
    async def _send_before_abort(writer: asyncio.StreamWriter, data: bytes) -> None:
        """Write ``data`` and wait until it has left this process: the connection is aborted next, which
        would drop what is still buffered."""
        writer.write(data)
        writer.transport.set_write_buffer_limits(high=0)
        with contextlib.suppress(ConnectionError, OSError):
            await writer.drain()

    def _note_refusal(self, peer_id: str, reason: str) -> None:
        """A peer refused this node and said why (HelloRefused): said once per peer, as an error, since this
        node cannot count in the cluster while its peers refuse it."""
        if peer_id in self._refused_by or len(self._refused_by) >= MAX_INCARNATIONS_REFUSED_LOGGED:
            return
        self._refused_by.add(peer_id)
        log.error("peer.refused_this_node", peer=peer_id, reason=reason[:REFUSAL_REASON_MAX_CHARS])

    def refused_by(self) -> list[str]:
        """The peers that refuse this node now (HelloRefused on their last link), sorted; a peer leaves
        the list once a link with it carries anything else (its /health field ``refused_by``)."""
        return sorted(self._refused_by)

    def _check_incarnation(self, peer_id: str, incarnation: bytes) -> None:
        """Refuse a member that proved the secret but is in another life of its data directory: it forgot
        what it acknowledged and whom it voted for (tokenvault/core/incarnations.py)."""
        if self._admit is None or self._admit(peer_id, incarnation):
            return
        said = self._incarnations_refused
        if (peer_id, incarnation) not in said and len(said) < MAX_INCARNATIONS_REFUSED_LOGGED:
            said.add((peer_id, incarnation))  # said once per member and life; the rest as handshake failures
            log.error("peer.incarnation_changed", peer=peer_id,
                      detail="this member's data directory is not the one it had when this node last saw it "
                      "(started empty, or on another disk): it forgot what it acknowledged, so its links are "
                      "refused; replace it with a new member (run_cluster.sh add-node, then remove-node of "
                      "this one; docs/failure-modes.md)")
        raise IncarnationChanged(f"{peer_id} is in another incarnation")

    def _check_settings(self, peer_id: str, settings: ReplicatedSettings) -> None:
        """Refuse a member that proved the secret with replicated-state settings other than this node's: one
        log applied with another idempotency retention holds another state (docs/configuration.md). Said
        once per member and settings, one line per setting that differs (an absent one as null)."""
        if settings == self._settings:
            return
        said = self._settings_refused
        if (peer_id, settings) not in said and len(said) < MAX_INCARNATIONS_REFUSED_LOGGED:
            said.add((peer_id, settings))  # the rest as handshake failures
            ours, theirs = dict(self._settings), dict(settings)
            for name in sorted(ours.keys() | theirs.keys()):
                if ours.get(name) != theirs.get(name):
                    log.error("peer.settings_differ", peer=peer_id, setting=name, this_node_value=ours.get(name),
                              peer_value=theirs.get(name), detail=SETTINGS_DIFFER_DETAIL)
        raise SettingsDiffer(f"{peer_id} has other replicated-state settings")

    # ----------------------------------------------------------------- serving
    async def _serve_connection(self, connection: _Connection) -> None:
        """Serve a link until it ends."""
        if self._closing:
            # Python 3.11's wait_for can swallow a cancellation that arrives as the connection or the
            # handshake completes (gh-86296): a link made while the transport closes is dropped here,
            # or close() would wait for it forever.
            connection.close()
            return
        peer_id = connection.peer_id
        previous = self._connections.get(peer_id)
        if previous is not None:
            previous.close()
        self._connections[peer_id] = connection
        self.last_seen_monotonic[peer_id] = time.monotonic()
        log.info("peer.up", peer=peer_id)
        writer_task = self._spawn(connection.write_loop())
        keepalive_task = self._spawn(self._keep_alive(connection))
        reason = "closed"
        accepted = False  # the first frame tells: HelloRefused, or anything else (the link is accepted)
        try:
            while True:
                data = await connection.reader.read(READ_CHUNK_BYTES)
                if not data:
                    break
                self.last_seen_monotonic[peer_id] = time.monotonic()
                for message in connection.decoder.feed(data):
                    if not accepted:
                        if isinstance(message, HelloRefused):  # the peer refuses this node
                            self._note_refusal(peer_id, message.reason)
                            raise RefusedByPeer(f"{peer_id} refused this node")
                        accepted = True
                        self._refused_by.discard(peer_id)
                    self._deliver(peer_id, message)
        except RefusedByPeer:
            reason = "refused"
        except ProtocolError as error:
            self.frames_rejected += 1
            reason = "bad_frame"
            log.warning("peer.bad_frame", peer=peer_id, reason=str(error)[:200])
        except (OSError, RuntimeError, asyncio.IncompleteReadError) as error:
            reason = type(error).__name__
        finally:
            writer_task.cancel()
            keepalive_task.cancel()
            connection.close()
            if self._connections.get(peer_id) is connection:
                del self._connections[peer_id]
                if not self._closing:
                    if connection.silent:
                        reason = "silent"
                    log.warning("peer.down", peer=peer_id, reason=reason)
                    if self._on_peer_down is not None:
                        self._on_peer_down(peer_id)

    async def _keep_alive(self, connection: _Connection) -> None:
        """Ping an idle link, and close it when the peer has been silent past the idle timeout."""
        interval = self._idle_timeout_seconds / 4
        sequence = 0
        while True:
            await asyncio.sleep(interval)
            silent_for = time.monotonic() - self.last_seen_monotonic.get(connection.peer_id, 0.0)
            if silent_for > self._idle_timeout_seconds:
                connection.silent = True
                connection.close()
                return
            if connection.queue.empty():
                sequence += 1
                connection.enqueue(encode_frame(Ping(sequence=sequence)))

    def _deliver(self, peer_id: str, message: object) -> None:
        if isinstance(message, (Hello, HelloProof, HelloRefused, Ping)):  # the transport's own frames
            return
        self._on_message(peer_id, message)
