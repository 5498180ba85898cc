"""Which life of its data directory each member is in, so that a member that lost its disk cannot vote.

A node's data directory holds a random *incarnation*, made with the directory and kept for its life. The
node presents it in every peer handshake (``Hello``, covered by the handshake's proof), and each node
remembers, durably, the incarnation it first saw for each member. A member that comes back under the same
id with a different incarnation was started on an empty (or another) data directory: it has forgotten what
it acknowledged and whom it voted for, and counting it in a majority could lose acknowledged writes. Its
links are refused (``peer.incarnation_changed``) until it is removed from the cluster; the way back is to
replace it with a new member (docs/failure-modes.md).

A member's record is dropped when it leaves the configuration, so that its id can be used again.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from tokenvault.core.wal import fsync_directory
from tokenvault.smallfiles import FileTooLarge, read_small_file

INCARNATION_FILE = "incarnation"
PEER_INCARNATIONS_FILE = "peer-incarnations.json"
INCARNATION_BYTES = 16
# A cluster has at most a few dozen members; a record file beyond this is not one this node wrote.
MAX_REMEMBERED_MEMBERS = 1024
MAX_RECORD_FILE_BYTES = 128 * 1024


class IncarnationError(Exception):
    """An incarnation file that is not what this node writes (the node refuses to start)."""


def _write_durably(path: Path, text: str) -> None:
    """Replace ``path`` with ``text``: a temporary file, fsynced, renamed over it, the directory fsynced."""
    temporary = path.with_name(path.name + ".tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(descriptor, text.encode("ascii"))
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    os.replace(temporary, path)
    fsync_directory(path.parent)


def _unreadable(path: Path, error: OSError) -> IncarnationError:
    """The refusal of a file that exists but cannot be read; the OS's reason, never the file's bytes."""
    return IncarnationError(f"{path} cannot be read ({error.strerror or type(error).__name__}); give the node back "
                            "read access to it, or replace the node if its data directory is damaged "
                            "(docs/failure-modes.md)")


def load_or_create_incarnation(data_dir: Path) -> bytes:
    """This data directory's incarnation: read, or made (and made durable) when the directory has none."""
    path = data_dir / INCARNATION_FILE
    try:
        text = read_small_file(path, 2 * INCARNATION_BYTES + 2).decode("ascii", "replace").strip()
    except FileNotFoundError:
        incarnation = os.urandom(INCARNATION_BYTES)
        _write_durably(path, incarnation.hex() + "\n")
        return incarnation
    except FileTooLarge:
        text = ""  # not the file this node wrote: refused below
    except OSError as error:  # a directory, a file the node may not read: EISDIR, EACCES
        raise _unreadable(path, error) from None
    try:
        incarnation = bytes.fromhex(text)
    except ValueError:
        incarnation = b""
    if len(incarnation) != INCARNATION_BYTES:
        raise IncarnationError(f"{path} does not hold {2 * INCARNATION_BYTES} hex characters; it is not a file "
                               "this node wrote (replace the node: docs/failure-modes.md)")
    return incarnation


class PeerIncarnations:
    """The incarnation first seen for each member, kept in the data directory.

    ``admit`` is called by the peer transport once a peer has proved the cluster secret; the first
    incarnation of a member is recorded durably before its link is used."""

    def __init__(self, data_dir: Path) -> None:
        self._path = data_dir / PEER_INCARNATIONS_FILE
        self._lock = threading.Lock()
        self._known = self._load()

    def _load(self) -> dict[str, bytes]:
        problem = f"{self._path} is not a record this node wrote (replace the node: docs/failure-modes.md)"
        try:
            document = json.loads(read_small_file(self._path, MAX_RECORD_FILE_BYTES))
        except FileNotFoundError:
            return {}
        except OSError as error:  # a directory, a file the node may not read: EISDIR, EACCES
            raise _unreadable(self._path, error) from None
        except (FileTooLarge, ValueError, RecursionError):  # RecursionError: JSON nested past the parser's depth
            raise IncarnationError(problem) from None
        if not isinstance(document, dict) or len(document) > MAX_REMEMBERED_MEMBERS:
            raise IncarnationError(problem)
        known: dict[str, bytes] = {}
        for member, text in document.items():
            try:
                incarnation = bytes.fromhex(text) if isinstance(text, str) else b""
            except ValueError:
                incarnation = b""
            if not member or len(member) > 64 or len(incarnation) != INCARNATION_BYTES:
                raise IncarnationError(problem)
            known[member] = incarnation
        return known

    def _save(self) -> None:
        text = json.dumps({member: incarnation.hex() for member, incarnation in sorted(self._known.items())})
        _write_durably(self._path, text + "\n")

    def known(self, member: str) -> bytes | None:
        with self._lock:
            return self._known.get(member)

    def admit(self, member: str, incarnation: bytes) -> bool:
        """True when ``incarnation`` is the one this node knows for ``member``, or the first it sees (then
        recorded); False when ``member`` was seen in another incarnation."""
        with self._lock:
            known = self._known.get(member)
            if known is not None:
                return known == incarnation
            if len(self._known) >= MAX_REMEMBERED_MEMBERS:
                return False
            self._known[member] = incarnation
            self._save()
            return True

    def forget(self, member: str) -> None:
        """``member`` left the configuration: the next node under its id is a new member."""
        with self._lock:
            if self._known.pop(member, None) is not None:
                self._save()
