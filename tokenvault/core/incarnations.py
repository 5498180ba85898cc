"""Which life of its data directory each member is in, so that a member that lost its disk cannot vote.

A node's data directory holds a random *incarnation*, made with the directory and kept for its life. The
node presents it in every peer handshake (``Hello``, covered by the handshake's proof), and each node
remembers, durably, the incarnation it first saw for each member. A member that comes back under the same
id with a different incarnation was started on an empty (or another) data directory: it has forgotten what
it acknowledged and whom it voted for, and counting it in a majority could lose acknowledged writes. Its
links are refused (``peer.incarnation_changed``) until it is removed from the cluster; the way back is to
replace it with a new member (docs/failure-modes.md).

Each record also holds the member's ``since`` (protocol/membership.py: the index of the configuration
entry that added it) as this node knew it when it recorded the incarnation. A member whose configuration
says a higher ``since`` is a later member under the same id (removed, then added again): its incarnation
replaces the record. So a node that never saw the removal (it caught up by a snapshot taken after both the
removal and the return, or whose log held the return when it applied the removal) still links to the
new member, while a member that lost its disk, whose ``since`` did not change, is still refused. A
member's record is dropped when it leaves the members this node links to, so the file holds the members
there are.

A member whose data directory was put back from an older copy keeps its incarnation. What gives it away is
its *floor*, the highest index it once acknowledged that was also committed: the primary computes the
floors and its heartbeats carry them, so every node holds them (protocol/replica.py), and a member whose
log ends below its floor counts in no election. ``MemberFloors`` keeps them in the data directory (taken
with a Ready, written once that Ready is durable, at most once a second), so that a restart keeps them.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from protocol.codec import MAX_INTEGER
from protocol.membership import MAX_MEMBERS, MAX_SINCE, is_member_id
from tokenvault.logs import get_logger
from tokenvault.smallfiles import FileTooLarge, read_small_file, replace_small_file

log = get_logger("tokenvault.core.incarnations")

INCARNATION_FILE = "incarnation"
PEER_INCARNATIONS_FILE = "peer-incarnations.json"
INCARNATION_BYTES = 16
# A cluster has at most a few dozen members; a record file beyond this is not one this node wrote.
MAX_REMEMBERED_MEMBERS = 1024
MAX_RECORD_FILE_BYTES = 128 * 1024
MEMBER_FLOORS_FILE = "member-floors.json"
MAX_FLOORS_FILE_BYTES = 16 * 1024
# Floors change with every commit under load; they are written at most this often.
FLOORS_SAVE_INTERVAL_SECONDS = 1.0
POLL_BASE_FILE = "poll-base"
# Each start numbers its pre-vote polls from a base at least this far above the last start's (one poll per
# election timeout at most: no start uses 2**32 of them).
POLL_SPAN = 2**32


class IncarnationError(Exception):
    """An incarnation file that is not what this node writes (the node refuses to start)."""


def _write_durably(path: Path, text: str) -> None:
    """Replace ``path`` with ``text``: a temporary file written whole, fsynced, renamed over it, the directory
    fsynced (replace_small_file)."""
    replace_small_file(path, text.encode("ascii"))


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


def take_poll_base(data_dir: Path, now_ns: int | None = None) -> int:
    """The number this start's pre-vote polls count from (RestoredState.first_poll), made durable before it
    is used: above every number an earlier start of this data directory used, whatever the wall clock
    says. It is the clock in nanoseconds, or the last start's base plus POLL_SPAN where that is higher (a
    clock set back across a restart). A reply to a poll of an earlier start then never matches one of this
    start's (docs/replication.md, floors). A record that cannot be read, or that cannot be written, is
    logged and the clock alone is used: polls only decide whether a refused vote is reported, never
    whether it is refused."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    path = data_dir / POLL_BASE_FILE
    previous = 0
    try:
        text = read_small_file(path, 32).decode("ascii", "replace").strip()
    except FileNotFoundError:
        text = None
    except (OSError, FileTooLarge) as error:
        text = None
        _poll_base_unreadable(path, getattr(error, "strerror", None) or type(error).__name__)
    if text is not None:
        if text.isdigit() and len(text) <= 19 and int(text) <= MAX_INTEGER - 2 * POLL_SPAN:
            previous = int(text)
        else:
            _poll_base_unreadable(path, "not a record this node wrote")
    base = max(now_ns, previous + POLL_SPAN) if previous else now_ns
    try:
        _write_durably(path, f"{base}\n")
    except OSError as error:
        log.warning("node.poll_base_not_saved", error=error.strerror or type(error).__name__)
    return base


def _poll_base_unreadable(path: Path, error: str) -> None:
    log.warning("node.poll_base_unreadable", path=str(path), error=error,
                detail="this start numbers its polls from the wall clock alone")


class PeerIncarnations:
    """The incarnation first seen for each member, kept in the data directory.

    ``admit`` is called by the peer transport once a peer has proved the cluster secret; the first
    incarnation of a member is recorded durably before its link is used."""

    def __init__(self, data_dir: Path) -> None:
        self._path = data_dir / PEER_INCARNATIONS_FILE
        self._lock = threading.Lock()
        self._known = self._load()

    def _load(self) -> dict[str, tuple[bytes, int]]:
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
        known: dict[str, tuple[bytes, int]] = {}
        for member, record in document.items():
            # [incarnation hex, since]; a file written before ``since`` holds the hex alone (since 0).
            text, since = (record, 0) if isinstance(record, str) else (
                record if isinstance(record, list) and len(record) == 2 else (None, None))
            try:
                incarnation = bytes.fromhex(text) if isinstance(text, str) else b""
            except ValueError:
                incarnation = b""
            if (not member or len(member) > 64 or len(incarnation) != INCARNATION_BYTES
                    or type(since) is not int or not 0 <= since <= MAX_SINCE):
                raise IncarnationError(problem)
            known[member] = (incarnation, since)
        return known

    def _save(self) -> None:
        text = json.dumps({member: [incarnation.hex(), since]
                           for member, (incarnation, since) in sorted(self._known.items())})
        _write_durably(self._path, text + "\n")

    def known(self, member: str) -> bytes | None:
        with self._lock:
            record = self._known.get(member)
            return None if record is None else record[0]

    def admit(self, member: str, incarnation: bytes, since: int = 0) -> bool:
        """True when ``incarnation`` is the one this node knows for ``member``, or the first it sees, or
        ``since`` (the member's, as this node's configuration says) is higher than the one recorded with
        it: a later member under the same id (then recorded); False when ``member`` was seen in another
        incarnation since the same addition."""
        with self._lock:
            known = self._known.get(member)
            if known is not None:
                recorded, recorded_since = known
                if recorded == incarnation:
                    if since > recorded_since:  # the same life, known now to have been added at ``since``
                        self._known[member] = (incarnation, since)
                        self._save()
                    return True
                if since <= recorded_since:
                    return False
                log.info("peer.incarnation_renewed", peer=member, since=since, recorded_since=recorded_since)
            elif len(self._known) >= MAX_REMEMBERED_MEMBERS:
                return False
            self._known[member] = (incarnation, since)
            self._save()
            return True

    def forget(self, member: str) -> None:
        """``member`` left the configuration: the next node under its id is a new member."""
        with self._lock:
            if self._known.pop(member, None) is not None:
                self._save()


Floors = tuple[tuple[str, int], ...]


class MemberFloors:
    """The members' floors (protocol Replica.floors) as this node last made them durable.

    ``offer`` is called with the floors taken just before a Ready, once that Ready is durable (so the
    restored view is at least the one of any heartbeat that raised them, as the core assumes); it
    writes them off the loop when they changed, at most every FLOORS_SAVE_INTERVAL_SECONDS. A record
    that cannot be read is set aside with a warning: floors only ever refuse a vote, so starting
    without them loses detection, never safety."""

    def __init__(self, data_dir: Path) -> None:
        self._path = data_dir / MEMBER_FLOORS_FILE
        self._lock = threading.Lock()  # one writer at a time: a flush at close may meet a save under way
        self.loaded: Floors = self._load()
        self._saved = self.loaded
        self._latest = self.loaded
        self._saving = False
        self._saved_at = -float("inf")

    def _load(self) -> Floors:
        try:
            document = json.loads(read_small_file(self._path, MAX_FLOORS_FILE_BYTES))
        except FileNotFoundError:
            return ()
        except (OSError, FileTooLarge, ValueError, RecursionError) as error:
            return self._set_aside(type(error).__name__)
        if (isinstance(document, dict) and len(document) <= MAX_MEMBERS
                and all(is_member_id(member) and type(floor) is int and 0 <= floor <= MAX_INTEGER
                        for member, floor in document.items())):
            return tuple(sorted(document.items()))
        return self._set_aside("not a record this node wrote")

    def _set_aside(self, error: str) -> Floors:
        log.warning("node.member_floors_unreadable", path=str(self._path), error=error,
                    detail="the node starts without the members' floors and learns them again from the "
                           "primary's heartbeats")
        return ()

    def offer(self, floors: Floors, now: float | None = None) -> bool:
        """Note ``floors`` (durable as far as the core is concerned); True when a write should start now
        (the caller runs ``save`` off the loop)."""
        self._latest = floors
        if floors == self._saved or self._saving:  # the first test is one of identity at almost every Ready
            return False
        now = time.monotonic() if now is None else now
        if now - self._saved_at < FLOORS_SAVE_INTERVAL_SECONDS:
            return False
        self._saving = True
        self._saved_at = now
        return True

    def save(self) -> None:
        """Write the latest floors offered (from a thread); a failure is logged, never raised."""
        try:
            with self._lock:
                floors = self._latest
                if floors != self._saved:
                    _write_durably(self._path, json.dumps(dict(floors)) + "\n")
                    self._saved = floors
        except OSError as error:
            log.warning("node.member_floors_not_saved", error=error.strerror or type(error).__name__)
        finally:
            self._saving = False
