"""fdatasync in a small child process, so the node's event loop never waits for it.

Why a process and not a thread: a worker thread needs the interpreter lock to
start the call and again to report back, and while the event loop is busy it
gets the lock only after the interpreter's switch interval (5 ms). Measured on
this project's 2-core machine, that hand-off made the WAL's group commit take
several times longer than the disk's own fdatasync and cost the node CPU
(docs/performance.md). A child process has an interpreter of its own.

The node passes the WAL's own open file descriptor with every request
(SCM_RIGHTS over a Unix socket pair), so the child syncs the very same open
file the node wrote through and sees exactly the write-back errors the node
would see; it then closes its copy. One request is in flight at a time.

Wire format: the node sends one byte, ``S``, with exactly one descriptor
attached; the child answers with a 4-byte big-endian errno (0: the data is
durable). The child exits when the node's end of the socket closes, which also
happens when the node is killed, and ignores SIGINT and SIGTERM so that it can
never disappear in the middle of a node's orderly shutdown.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import socket
import subprocess
import sys

REQUEST_SYNC = b"S"
REPLY_BYTES = 4
EXIT_TIMEOUT_SECONDS = 5.0


class FsyncHelperGone(OSError):
    """The helper process is gone or its socket broke: the outcome of the last fsync is unknown."""


class FsyncHelper:
    """The node's side: start the child, ask it to fdatasync descriptors, stop it."""

    def __init__(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "tokenvault.fsync_helper", str(child.fileno())],
                pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        parent.setblocking(False)
        self._socket = parent
        self._broken = False

    @property
    def pid(self) -> int:
        return self._process.pid

    async def fdatasync(self, descriptor: int) -> None:
        """Return once the child's fdatasync of ``descriptor`` succeeded; raise OSError if it failed.

        Raises FsyncHelperGone when the child is gone or the exchange was cut
        short (then nobody knows whether the data reached the disk).
        """
        if self._broken:
            raise FsyncHelperGone(errno.EPIPE, "the fsync helper failed earlier")
        self._broken = True  # until a whole exchange has completed
        loop = asyncio.get_running_loop()
        try:
            # The socket buffer is empty (one request at a time), so this never blocks.
            socket.send_fds(self._socket, [REQUEST_SYNC], [descriptor])
            reply = b""
            while len(reply) < REPLY_BYTES:
                chunk = await loop.sock_recv(self._socket, REPLY_BYTES - len(reply))
                if not chunk:
                    raise FsyncHelperGone(errno.EPIPE, "the fsync helper process exited")
                reply += chunk
        except FsyncHelperGone:
            raise
        except OSError as error:
            raise FsyncHelperGone(error.errno or errno.EPIPE, f"the fsync helper is unreachable: {error}") from None
        self._broken = False
        code = int.from_bytes(reply, "big")
        if code:
            raise OSError(code, os.strerror(code))

    def close(self) -> None:
        """Close the socket (the child exits on its own) and reap the child."""
        self._broken = True
        self._socket.close()
        try:
            self._process.wait(timeout=EXIT_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


def serve(connection: socket.socket) -> int:
    """The child's loop: fdatasync each descriptor it is sent, answer the errno."""
    while True:
        try:
            data, descriptors, _, _ = socket.recv_fds(connection, 1, 1)
        except OSError:
            return 0
        try:
            if not data:
                return 0  # the node closed its end (or died)
            code = 0
            if data != REQUEST_SYNC or len(descriptors) != 1:
                code = errno.EINVAL
            else:
                try:
                    os.fdatasync(descriptors[0])
                except OSError as error:
                    code = error.errno or errno.EIO
        finally:
            for descriptor in descriptors:
                os.close(descriptor)
        try:
            connection.sendall(code.to_bytes(REPLY_BYTES, "big"))
        except OSError:
            return 0


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if len(argv) != 2 or not argv[1].isdigit():
        print("usage: python -m tokenvault.fsync_helper <socket descriptor>", file=sys.stderr)
        return 2
    with socket.socket(fileno=int(argv[1])) as connection:
        return serve(connection)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
