"""tokenvault.core.incarnations: a data directory's incarnation, and the incarnations a node has seen."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from structlog.testing import capture_logs

from tokenvault.core.incarnations import (FLOORS_SAVE_INTERVAL_SECONDS, INCARNATION_BYTES, INCARNATION_FILE,
                                          MAX_REMEMBERED_MEMBERS, MEMBER_FLOORS_FILE, PEER_INCARNATIONS_FILE,
                                          POLL_BASE_FILE, POLL_SPAN, IncarnationError, MemberFloors,
                                          PeerIncarnations, load_or_create_incarnation, take_poll_base)


def test_a_data_directory_keeps_its_incarnation_and_a_new_one_gets_another(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    first = load_or_create_incarnation(tmp_path / "a")
    assert len(first) == INCARNATION_BYTES
    assert load_or_create_incarnation(tmp_path / "a") == first  # a restart: the same life
    assert (tmp_path / "a" / INCARNATION_FILE).stat().st_mode & 0o077 == 0
    (tmp_path / "b").mkdir()
    assert load_or_create_incarnation(tmp_path / "b") != first  # an empty directory: a new life


@pytest.mark.parametrize("text", ["", "zz" * INCARNATION_BYTES, "ab" * (INCARNATION_BYTES - 1), "ab" * 100])
def test_an_incarnation_file_this_node_did_not_write_is_refused(tmp_path: Path, text: str) -> None:
    (tmp_path / INCARNATION_FILE).write_text(text)
    with pytest.raises(IncarnationError, match="replace the node"):
        load_or_create_incarnation(tmp_path)


def test_the_first_incarnation_of_a_member_is_admitted_remembered_and_another_refused(tmp_path: Path) -> None:
    one, other = b"\x01" * INCARNATION_BYTES, b"\x02" * INCARNATION_BYTES
    seen = PeerIncarnations(tmp_path)
    assert seen.admit("n2", one) and seen.admit("n2", one)
    assert not seen.admit("n2", other)
    # Durable: a restarted node still refuses the member's other life.
    again = PeerIncarnations(tmp_path)
    assert again.known("n2") == one and not again.admit("n2", other)
    # A member that left the configuration is forgotten, on disk too: its id may come back as a new member.
    again.forget("n2")
    assert PeerIncarnations(tmp_path).known("n2") is None
    assert PeerIncarnations(tmp_path).admit("n2", other)


def test_a_member_added_again_under_its_id_is_a_new_member_and_one_that_lost_its_disk_is_not(
        tmp_path: Path) -> None:
    """``since``: the index of the configuration entry that added the member, as this node's configuration
    says. A higher one than recorded is a later member under the id (removed, added again: the record of
    the earlier one is replaced, and said); the same one in another incarnation lost its disk (refused)."""
    first, wiped, later = (bytes([number]) * INCARNATION_BYTES for number in (1, 2, 3))
    seen = PeerIncarnations(tmp_path)
    assert seen.admit("n4", first, since=12)
    assert not seen.admit("n4", wiped, since=12), "the same member in another life"
    assert not seen.admit("n4", wiped, since=5), "a configuration behind the record says nothing newer"
    with capture_logs() as logs:
        assert seen.admit("n4", later, since=40), "added again at 40: a new member"
    assert [(line["event"], line["peer"], line["since"], line["recorded_since"]) for line in logs] == [
        ("peer.incarnation_renewed", "n4", 40, 12)]
    restarted = PeerIncarnations(tmp_path)
    assert restarted.known("n4") == later and not restarted.admit("n4", first, since=40)
    assert not restarted.admit("n4", wiped, since=40)
    assert restarted.admit("n4", later, since=40)


def test_a_record_written_before_since_reads_as_since_0(tmp_path: Path) -> None:
    one, other = b"\x01" * INCARNATION_BYTES, b"\x02" * INCARNATION_BYTES
    (tmp_path / PEER_INCARNATIONS_FILE).write_text(json.dumps({"n2": one.hex()}))
    seen = PeerIncarnations(tmp_path)
    assert seen.known("n2") == one and not seen.admit("n2", other, since=0)
    assert seen.admit("n2", other, since=3)
    assert json.loads((tmp_path / PEER_INCARNATIONS_FILE).read_text()) == {"n2": [other.hex(), 3]}


@pytest.mark.parametrize("content", [b"not json", b"[]", json.dumps({"n2": "abcd"}).encode(),
                                     json.dumps({"": "ab" * INCARNATION_BYTES}).encode(),
                                     json.dumps({"n2": 7}).encode(), b"{" + b" " * 200_000 + b"}",
                                     json.dumps({"n2": ["ab" * INCARNATION_BYTES]}).encode(),
                                     json.dumps({"n2": ["ab" * INCARNATION_BYTES, -1]}).encode(),
                                     json.dumps({"n2": ["ab" * INCARNATION_BYTES, True]}).encode(),
                                     json.dumps({"n2": ["ab" * INCARNATION_BYTES, 2**63]}).encode(),
                                     json.dumps({"n2": [7, 1]}).encode()])
def test_a_record_file_this_node_did_not_write_is_refused(tmp_path: Path, content: bytes) -> None:
    (tmp_path / PEER_INCARNATIONS_FILE).write_bytes(content)
    with pytest.raises(IncarnationError, match="replace the node"):
        PeerIncarnations(tmp_path)


def test_the_record_is_bounded(tmp_path: Path) -> None:
    seen = PeerIncarnations(tmp_path)
    seen._known = {f"m{number}": (b"\x01" * INCARNATION_BYTES, 0) for number in range(MAX_REMEMBERED_MEMBERS)}
    assert not seen.admit("one-more", b"\x01" * INCARNATION_BYTES)


# Deeper than json's parser goes (it raises RecursionError, which is not a ValueError), within the file's bound.
DEEPLY_NESTED = b"[" * 100_000
NOBODY = 65534


def test_a_record_file_nested_past_the_parser_s_depth_is_refused_clearly(tmp_path: Path) -> None:
    (tmp_path / PEER_INCARNATIONS_FILE).write_bytes(DEEPLY_NESTED)
    with pytest.raises(IncarnationError, match="is not a record this node wrote"):
        PeerIncarnations(tmp_path)


@pytest.mark.parametrize("name", [INCARNATION_FILE, PEER_INCARNATIONS_FILE])
def test_a_file_that_is_a_directory_is_refused_naming_it_and_the_os_reason(tmp_path: Path, name: str) -> None:
    (tmp_path / name).mkdir()
    (tmp_path / name / "inside").write_text("ab" * INCARNATION_BYTES)
    with pytest.raises(IncarnationError) as raised:
        load_or_create_incarnation(tmp_path) if name == INCARNATION_FILE else PeerIncarnations(tmp_path)
    assert str(raised.value).startswith(f"{tmp_path / name} cannot be read (Is a directory)")
    assert (tmp_path / name / "inside").read_text() == "ab" * INCARNATION_BYTES  # nothing replaced or removed


@contextlib.contextmanager
def without_root_s_privilege() -> Iterator[None]:
    """The file checks of the block made as user nobody when the tests run as root (as CI does): root
    reads a file whatever its mode. Only the effective uid changes, and it is restored after."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(NOBODY)
    try:
        yield
    finally:
        os.seteuid(0)


@pytest.mark.parametrize("name", [INCARNATION_FILE, PEER_INCARNATIONS_FILE])
def test_a_file_the_node_may_not_read_is_refused_naming_it_and_the_os_reason(name: str) -> None:
    # A directory anyone may pass through (pytest's base is its user's alone), holding a file of mode 0.
    directory = Path(tempfile.mkdtemp())
    try:
        directory.chmod(0o711)
        path = directory / name
        path.write_text("ab" * INCARNATION_BYTES if name == INCARNATION_FILE else "{}")
        path.chmod(0)
        with pytest.raises(IncarnationError) as raised, without_root_s_privilege():
            load_or_create_incarnation(directory) if name == INCARNATION_FILE else PeerIncarnations(directory)
        assert str(raised.value).startswith(f"{path} cannot be read (Permission denied)")
        path.chmod(0o600)
        assert path.read_text() == ("ab" * INCARNATION_BYTES if name == INCARNATION_FILE else "{}")  # not replaced
    finally:
        shutil.rmtree(directory)


# --------------------------------------------------------------------------- members' floors


def test_member_floors_are_written_when_they_change_at_most_once_an_interval_and_read_back(tmp_path: Path) -> None:
    floors = MemberFloors(tmp_path)
    assert floors.loaded == ()
    first = (("n1", 7), ("n2", 5))
    assert floors.offer(first, now=100.0)
    floors.save()
    assert json.loads((tmp_path / MEMBER_FLOORS_FILE).read_text()) == {"n1": 7, "n2": 5}
    assert (tmp_path / MEMBER_FLOORS_FILE).stat().st_mode & 0o077 == 0
    assert not floors.offer(first, now=200.0), "unchanged: nothing to write"
    second = (("n1", 9), ("n2", 9))
    assert not floors.offer(second, now=100.0 + FLOORS_SAVE_INTERVAL_SECONDS / 2), "too soon after the last"
    floors.save()  # at close: the latest offered is written whatever the interval
    assert MemberFloors(tmp_path).loaded == second


@pytest.mark.parametrize("text", ['{"n1": "7"}', '{"n1": -1}', '{"n1": 1.5}', '{"": 3}', '{"\\ud800": 3}',
                                  '{"n1": true}', '[["n1", 3]]',
                                  '{"' + "x" * 65 + '": 3}', json.dumps({f"n{i}": 1 for i in range(10)}),
                                  "[" * 10_000, "[" * 100_000, "{" + " " * 20_000 + "}", "not json"])
def test_a_member_floors_record_the_node_did_not_write_is_set_aside_with_a_warning(tmp_path: Path, text: str) -> None:
    """Floors only ever refuse a vote: a record that cannot be used is set aside (logged), never a reason
    not to start."""
    (tmp_path / MEMBER_FLOORS_FILE).write_text(text)
    with capture_logs() as logs:
        assert MemberFloors(tmp_path).loaded == ()
    assert [entry["log_level"] for entry in logs if entry["event"] == "node.member_floors_unreadable"] == ["warning"]


def test_a_member_floors_record_that_is_a_directory_is_set_aside_and_a_failed_write_is_logged(tmp_path: Path) -> None:
    (tmp_path / MEMBER_FLOORS_FILE).mkdir()
    with capture_logs() as logs:
        floors = MemberFloors(tmp_path)
        assert floors.loaded == ()
        assert floors.offer((("n1", 3),), now=1.0)
        floors.save()  # a directory is in the way: the write fails, said, not raised
        assert floors.offer((("n1", 4),), now=1.0 + FLOORS_SAVE_INTERVAL_SECONDS), "tried again at the next change"
    assert [entry["event"] for entry in logs] == ["node.member_floors_unreadable", "node.member_floors_not_saved"]


# --------------------------------------------------------------------------- the base of a start's poll numbers


def test_each_start_numbers_its_polls_above_the_last_starts_even_with_the_clock_set_back(tmp_path: Path) -> None:
    """RestoredState.first_poll: a late reply to a poll of an earlier start must never match one of this
    start's (docs/replication.md). The wall clock alone gave a lower base after a clock set back across a
    restart; the last base, kept durably, keeps each start's numbers above the one before."""
    now = 1_800_000_000 * 10**9
    first = take_poll_base(tmp_path, now_ns=now)
    assert first == now
    assert (tmp_path / POLL_BASE_FILE).stat().st_mode & 0o077 == 0
    second = take_poll_base(tmp_path, now_ns=now - 3600 * 10**9)  # the clock went back an hour
    assert second >= first + POLL_SPAN
    third = take_poll_base(tmp_path, now_ns=now + 3600 * 10**9)  # and forward again: the clock, as before
    assert third == now + 3600 * 10**9 > second


@pytest.mark.parametrize("text", ["", "-5", "1.5", "12x", "9" * 19, "9" * 40, "\u0661\u0662"])
def test_a_poll_base_record_the_node_did_not_write_is_set_aside_with_a_warning(tmp_path: Path, text: str) -> None:
    """Polls only decide whether a refused vote is reported: a record that cannot be used is logged and the
    clock is used, never a reason not to start; the record is written again."""
    (tmp_path / POLL_BASE_FILE).write_text(text)
    with capture_logs() as logs:
        assert take_poll_base(tmp_path, now_ns=10**18) == 10**18
    assert [entry["event"] for entry in logs] == ["node.poll_base_unreadable"]
    assert take_poll_base(tmp_path, now_ns=10**18) == 10**18 + POLL_SPAN


def test_a_poll_base_record_that_is_a_directory_is_set_aside_and_the_failed_write_is_logged(tmp_path: Path) -> None:
    (tmp_path / POLL_BASE_FILE).mkdir()
    with capture_logs() as logs:
        assert take_poll_base(tmp_path, now_ns=10**18) == 10**18
    assert [entry["event"] for entry in logs] == ["node.poll_base_unreadable", "node.poll_base_not_saved"]
