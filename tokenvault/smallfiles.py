"""Reading a small file whose size nothing vouches for: at most a bound, never the whole of a file that
grew, or was made, huge.

A node reads a few small files whole: its config, its store's ``CURRENT`` pointer, the store's
options record, its incarnation and peer records, a migration's state file, cluster.json. Each is
read through ``read_small_file`` with a bound far above what the file ever holds, so a damaged or
hostile file costs at most that bound in memory and is refused with an error naming the file,
instead of being buffered whole. (TLS PEM files and key files have bounded readers of their own,
which check the file's owner and mode on the open descriptor first.)
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
