"""Reading a small file whose size nothing vouches for: at most a bound, never the whole of a file that
grew, or was made, huge.

A node reads a few small files whole: its config, its store's ``CURRENT`` pointer, the store's
options record, its incarnation and peer records, a migration's state file, cluster.json. Each is
read through ``read_small_file`` with a bound far above what the file ever holds, so a damaged or
hostile file costs at most that bound in memory and is refused with an error naming the file,
instead of being buffered whole. (TLS PEM files and key files have bounded readers of their own,
which check the file's owner and mode on the open descriptor first.)

``replace_small_file`` writes one of them (a node's peer incarnations and members' floors, a migration's state
file) durably and whole: a write may take fewer bytes than it was given (a disk all but full), so it is
repeated until every byte is in, and the rename that publishes the file is made durable by an fsync of its
directory.
"""

from __future__ import annotations

import os
from pathlib import Path


# cluster.json (tokenvault.devcluster.cluster_spec writes it, the admin CLI and run_cluster.sh read it) names
# a few nodes and keys, a few KB; it is kept here so that neither reader imports the other's package.
MAX_CLUSTER_FILE_BYTES = 1 << 20


class FileTooLarge(Exception):
    """The file holds more than the bound; the message names the file and the bound, nothing of its bytes."""


def read_small_file(path: Path | str, max_bytes: int) -> bytes:
    """The whole of ``path``, at most ``max_bytes`` (FileTooLarge past them, after reading one byte
    more, never the rest); OSError as ``open`` raises it."""
    with open(path, "rb") as handle:
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise FileTooLarge(f"{os.fspath(path)!r} is larger than {max_bytes} bytes")
    return data


def replace_small_file(path: Path, content: bytes) -> None:
    """Put ``content`` at ``path`` durably and whole: ``path`` + ".tmp" (owner only) is written to its last
    byte, fsynced, renamed over ``path``, and the directory fsynced; OSError as the calls raise it."""
    temporary = path.with_name(path.name + ".tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        write_whole(descriptor, content)
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    os.replace(temporary, path)
    fsync_directory(path.parent)


def write_whole(descriptor: int, content: bytes) -> None:
    """Write ``content`` to its last byte: one os.write may write only part of it (a disk nearly full)."""
    data = memoryview(content)
    while data:
        data = data[os.write(descriptor, data):]


def fsync_directory(directory: Path) -> None:
    """Make a rename or a creation in ``directory`` durable."""
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
