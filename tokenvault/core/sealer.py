"""A helper process that seals large tokenize batches beside the node's event loop.

A node is one Python process, and its event loop runs on one core: HTTP, JSON,
the replication core, the WAL and the store all share it. Sealing a value (HMAC
for the token, AES-SIV for the ciphertext) is pure computation that needs only
the epoch's keys, so a batch of values can be sealed by a second process on the
machine's other core while the loop goes on with everything else.

The parent (``Sealer``) starts ``python -m tokenvault.core.sealer FD`` and talks
msgpack over a Unix socket pair. The child never holds the master key (which may
not even be in memory: a PKCS#11 token keeps it), nor its PIN: it starts with an
environment stripped of every ``TOKENVAULT_*`` variable, no standard input, and
learns each epoch's derived keys over the socket pair:

- ``[0, epoch, token_key, data_key]``: learn an epoch (``EpochKeys.derived_keys``),
  sent once per epoch before the first batch sealed in it.
- ``[1, request_id, epoch, values]``: seal; answered ``[request_id, tokens,
  ciphertexts]``, or ``[request_id, None, None]`` when the child cannot (the
  parent then seals in process, which raises the proper error).
- ``[2, epoch]``: forget an epoch's keys (the epoch was destroyed); no answer.

The child runs the same ``EpochKeys.seal`` as the node, so tokens do not depend
on which process sealed them; the parent still re-seals the first value of
every answer itself and stops using the child on any difference. When the child
dies, hangs or answers out of shape, the parent logs ``sealer.failed``, fails
over to sealing in process for good and never answers a request wrongly. Small
batches (below ``min_values``) and batches that would queue too much work on the
child (``max_pending_values``) are sealed in process: the round trip costs more
than it saves for a few values, and both cores stay busy under load.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import msgpack

from tokenvault.crypto.keys import EpochKeys
from tokenvault.futures import await_future
from tokenvault.logs import get_logger

log = get_logger("sealer")

ADD_EPOCH = 0
SEAL = 1
FORGET_EPOCH = 2
# Bounds on what one message may hold, checked by both sides; the parent only
# sends batches under MAX_BATCH_BYTES (values' UTF-8 bytes, counted at most).
MAX_BATCH_VALUES = 100_000
MAX_BATCH_BYTES = 32 * 1024 * 1024
MAX_MESSAGE_BYTES = 2 * MAX_BATCH_BYTES
RECEIVE_BYTES = 256 * 1024
# The child inherits no variable of this prefix: TOKENVAULT_MASTER_KEY (already
# removed when it was read), a PKCS#11 PIN variable, or any later secret.
PRIVATE_ENVIRONMENT_PREFIX = "TOKENVAULT_"
MAX_EPOCHS = 100_000  # epochs one child may learn; more is a confused parent


def child_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The parent's environment without any TOKENVAULT_* variable."""
    environment = dict(os.environ if environ is None else environ)
    return {name: value for name, value in environment.items() if not name.startswith(PRIVATE_ENVIRONMENT_PREFIX)}


class SealerUnavailable(Exception):
    """The helper cannot seal this batch; the caller seals it in process."""


class Sealer:
    """The parent's side: ``wants`` says whether a batch should go to the child, ``seal`` sends it."""

    def __init__(self, process: subprocess.Popen[bytes], *, min_values: int, max_pending_values: int,
                 max_value_bytes: int, timeout_seconds: float) -> None:
        self._process = process
        self.min_values = min_values
        self.max_pending_values = max_pending_values
        self._max_value_bytes = max_value_bytes
        self._timeout_seconds = timeout_seconds
        self._transport: asyncio.Transport | None = None
        self._unpacker = msgpack.Unpacker(raw=False, max_buffer_size=MAX_MESSAGE_BYTES)
        self._request_ids = itertools.count(1)
        self._pending: dict[int, tuple[asyncio.Future[Any], int]] = {}
        self._epochs_sent: set[int] = set()
        self.pending_values = 0
        self.alive = False
        self.batches = 0  # batches the child sealed (tests read it; /metrics counts values)

    @classmethod
    async def start(cls, *, min_values: int, max_pending_values: int,
                    max_value_bytes: int, timeout_seconds: float) -> "Sealer":
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "tokenvault.core.sealer", str(child_end.fileno())],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, pass_fds=(child_end.fileno(),),
                close_fds=True, env=child_environment())
        except BaseException:
            parent_end.close()
            raise
        finally:
            child_end.close()
        sealer = cls(process, min_values=min_values, max_pending_values=max_pending_values,
                     max_value_bytes=max_value_bytes, timeout_seconds=timeout_seconds)
        try:
            loop = asyncio.get_running_loop()
            await loop.create_connection(lambda: _SealerProtocol(sealer), sock=parent_end)
        except BaseException:
            parent_end.close()
            process.kill()
            process.wait()
            raise
        sealer.alive = True
        log.info("sealer.started", pid=process.pid, min_values=min_values)
        return sealer

    @property
    def pid(self) -> int:
        return self._process.pid

    def forget(self, epoch: int) -> None:
        """Make the child drop an epoch's keys (a destroyed epoch); nothing to do if it never learnt them."""
        if epoch not in self._epochs_sent:
            return
        self._epochs_sent.discard(epoch)
        if self.alive and self._transport is not None:
            self._transport.write(msgpack.packb([FORGET_EPOCH, epoch]))

    def wants(self, count: int) -> bool:
        """Whether a batch of ``count`` values should be sealed by the child."""
        return (self.alive and self.min_values <= count <= MAX_BATCH_VALUES
                and count * self._max_value_bytes <= MAX_BATCH_BYTES
                and self.pending_values + count <= self.max_pending_values)

    async def seal(self, keys: EpochKeys, values: Sequence[str]) -> tuple[tuple[str, bytes], ...]:
        """(token, ciphertext) pairs for ``values``, as ``keys.seal_many`` gives them.

        Raises SealerUnavailable if the child cannot answer; the caller then
        seals in process.
        """
        if not self.alive or self._transport is None:
            raise SealerUnavailable("the sealer is not running")
        request_id = next(self._request_ids)
        try:
            frames = [msgpack.packb([SEAL, request_id, keys.epoch, values])]
        except (TypeError, ValueError, UnicodeError):
            # Not text the child can receive (the in-process seal names the problem).
            raise SealerUnavailable("the batch cannot be sent to the sealer") from None
        if keys.epoch not in self._epochs_sent:
            frames.insert(0, msgpack.packb([ADD_EPOCH, keys.epoch, *keys.derived_keys()]))
            self._epochs_sent.add(keys.epoch)
        future = asyncio.get_running_loop().create_future()
        self._pending[request_id] = (future, len(values))
        self.pending_values += len(values)
        self._transport.write(b"".join(frames))
        try:
            tokens, ciphertexts = await await_future(future, self._timeout_seconds)
        except asyncio.TimeoutError:
            self._fail(f"no answer within {self._timeout_seconds:g} s")
            raise SealerUnavailable("the sealer did not answer in time") from None
        if tokens is None:
            raise SealerUnavailable("the sealer could not seal this batch")
        if (not isinstance(tokens, list) or not isinstance(ciphertexts, list)
                or len(tokens) != len(values) or len(ciphertexts) != len(values)):
            self._fail("an answer of the wrong shape")
            raise SealerUnavailable("the sealer answered out of shape")
        # The child runs the same code with the same keys; checking one value per
        # batch catches a child that does not (a wrong key, a different build).
        if keys.seal(values[0]) != (tokens[0], ciphertexts[0]):
            self._fail("an answer that differs from sealing in process")
            raise SealerUnavailable("the sealer's answer did not check out")
        self.batches += 1
        return tuple(zip(tokens, ciphertexts))

    def _on_message(self, message: object) -> None:
        if not (isinstance(message, list) and len(message) == 3 and isinstance(message[0], int)):
            self._fail("a message of the wrong shape")
            return
        entry = self._pending.pop(message[0], None)
        if entry is None:
            self._fail("an answer to no request")
            return
        future, count = entry
        self.pending_values -= count
        if not future.done():
            future.set_result((message[1], message[2]))

    def _fail(self, reason: str) -> None:
        """Stop using the child for good: every waiting batch falls back to sealing in process."""
        if self.alive:
            log.error("sealer.failed", reason=reason, pid=self._process.pid)
        self.alive = False
        if self._transport is not None:
            self._transport.abort()
        if self._process.poll() is None:
            self._process.kill()
            # Reaped off the loop, so a node that goes on without its helper keeps no zombie.
            asyncio.get_running_loop().run_in_executor(None, self._process.wait)
        self._release_waiting()

    def _release_waiting(self) -> None:
        """Answer every waiting batch "cannot": its caller seals it in process."""
        for future, _ in self._pending.values():
            if not future.done():
                future.set_result((None, None))
        self._pending.clear()
        self.pending_values = 0

    async def close(self) -> None:
        """Stop the child: closing the socket ends it; it is killed if it does not go in time."""
        self.alive = False
        if self._transport is not None:
            self._transport.close()
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.run_in_executor(None, self._process.wait), 2.0)
        except asyncio.TimeoutError:
            self._process.kill()
            await loop.run_in_executor(None, self._process.wait)
        self._release_waiting()


class _SealerProtocol(asyncio.Protocol):
    def __init__(self, sealer: Sealer) -> None:
        self._sealer = sealer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._sealer._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        sealer = self._sealer
        try:
            sealer._unpacker.feed(data)
            for message in sealer._unpacker:
                sealer._on_message(message)
        except (msgpack.exceptions.BufferFull, msgpack.exceptions.ExtraData, ValueError, TypeError):
            sealer._fail("an undecodable answer")

    def connection_lost(self, exc: Exception | None) -> None:
        if self._sealer.alive:
            self._sealer._fail("the sealer process went away")


# ------------------------------------------------------------------ the child
def _answer(ring: dict[int, EpochKeys], message: object) -> bytes | None:
    if not isinstance(message, list) or not message:
        raise ValueError("a message of the wrong shape")
    if message[0] == ADD_EPOCH and len(message) == 4:
        _, epoch, token_key, data_key = message
        if len(ring) >= MAX_EPOCHS and epoch not in ring:
            raise ValueError("too many epochs")
        try:
            ring[epoch] = EpochKeys.from_derived_keys(epoch, token_key, data_key)
        except (TypeError, ValueError):
            pass  # a seal request for this epoch is then answered "cannot"
        return None
    if message[0] == FORGET_EPOCH and len(message) == 2:
        ring.pop(message[1], None)
        return None
    if message[0] == SEAL and len(message) == 4:
        _, request_id, epoch, values = message
        if (not isinstance(values, list) or not 0 < len(values) <= MAX_BATCH_VALUES
                or not isinstance(epoch, int) or epoch not in ring):
            return _packed([request_id, None, None])
        try:
            pairs = ring[epoch].seal_many(values)
        except Exception:
            return _packed([request_id, None, None])
        return _packed([request_id, [token for token, _ in pairs], [ciphertext for _, ciphertext in pairs]])
    raise ValueError("a message of the wrong shape")


def child_main(descriptor: int) -> int:
    """Serve seal requests on ``descriptor`` until the parent closes it."""
    ring: dict[int, EpochKeys] = {}
    connection = socket.socket(fileno=descriptor)
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=MAX_MESSAGE_BYTES)
    while True:
        data = connection.recv(RECEIVE_BYTES)
        if not data:
            return 0
        unpacker.feed(data)
        answers = [answer for answer in map(lambda message: _answer(ring, message), unpacker) if answer]
        if answers:
            connection.sendall(b"".join(answers))




def _packed(message: list[Any]) -> bytes:
    packed: bytes = msgpack.packb(message)
    return packed

if __name__ == "__main__":
    if len(sys.argv) != 2 or not sys.argv[1].isdigit():
        sys.exit("usage: python -m tokenvault.core.sealer FD (started by a node, not by hand)")
    # The node handles SIGINT and SIGTERM for both; the child ends when the socket closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        sys.exit(child_main(int(sys.argv[1])))
    except Exception as error:  # noqa: BLE001 - a traceback could carry what was being sealed
        sys.stderr.write(f"tokenvault sealer: stopping after {type(error).__name__}\n")
        sys.exit(1)
