"""tokenvault.smallfiles: the small files a node, the CLI and the dev cluster read whole are read to a
bound, so a huge one (damaged, or made so) costs at most that bound in memory and is refused with an
error naming the file."""

from __future__ import annotations

import os
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import click
import pytest

from tokenvault.cli import connection as cli_connection, lifecycle as cli_lifecycle
from tokenvault.config import ConfigError, load_config
from tokenvault.core import incarnations
from tokenvault.core.store import VaultStore
from tokenvault.core.store_layout import ROCKSDICT_CONFIG_FILE, StoreCorruption, check_rocksdict_config
from tokenvault.devcluster import cluster, cluster_spec
from tokenvault.smallfiles import FileTooLarge, read_small_file

HUGE_BYTES = 256 << 20  # sparse: nothing is written, but a whole read would buffer all of it
# What reading a small file to its bound may allocate at the most (the largest bound is cluster.json's 1 MiB).
PEAK_BOUND_BYTES = 2 << 20


def make_huge(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.truncate(HUGE_BYTES)
    return path


def peak_bytes_of(call: Callable[[], Any]) -> int:
    """Python's peak allocation while ``call`` runs (it may raise)."""
    tracemalloc.start()
    try:
        call()
    except Exception:
        pass
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak


def test_a_file_is_read_whole_up_to_the_bound_and_refused_one_byte_past_it(tmp_path: Path) -> None:
    path = tmp_path / "small"
    path.write_bytes(b"x" * 100)
    assert read_small_file(path, 100) == b"x" * 100
    with pytest.raises(FileTooLarge, match=r"small'? is larger than 99 bytes"):
        read_small_file(path, 99)
    with pytest.raises(FileNotFoundError):
        read_small_file(tmp_path / "absent", 100)


def test_a_huge_file_is_refused_after_reading_only_the_bound(tmp_path: Path) -> None:
    path = make_huge(tmp_path / "huge")
    with pytest.raises(FileTooLarge):
        read_small_file(path, 4096)
    assert peak_bytes_of(lambda: read_small_file(path, 4096)) < 64 * 1024


def _huge_node_config(tmp_path: Path) -> Callable[[], Any]:
    path = make_huge(tmp_path / "node.toml")
    return lambda: load_config(path)


def _store_with_huge_current(tmp_path: Path) -> Callable[[], Any]:
    path = tmp_path / "store"
    VaultStore.open(path).close()
    make_huge(path / "CURRENT")
    return lambda: VaultStore.open(path)


def _store_with_huge_rocksdict_config(tmp_path: Path) -> Callable[[], Any]:
    make_huge(tmp_path / ROCKSDICT_CONFIG_FILE)
    return lambda: check_rocksdict_config(tmp_path, StoreCorruption)


def _huge_incarnation(tmp_path: Path) -> Callable[[], Any]:
    make_huge(tmp_path / incarnations.INCARNATION_FILE)
    return lambda: incarnations.load_or_create_incarnation(tmp_path)


def _huge_peer_incarnations(tmp_path: Path) -> Callable[[], Any]:
    make_huge(tmp_path / incarnations.PEER_INCARNATIONS_FILE)
    return lambda: incarnations.PeerIncarnations(tmp_path)


def _huge_migration_state(tmp_path: Path) -> Callable[[], Any]:
    path = make_huge(tmp_path / "state.json")
    return lambda: cli_lifecycle._read_state(path, 3)


def _huge_cluster_file_for_the_cli(tmp_path: Path) -> Callable[[], Any]:
    path = make_huge(tmp_path / "cluster.json")
    return lambda: cli_connection._load_cluster_json(str(path))


def _huge_cluster_file_for_the_dev_cluster(tmp_path: Path) -> Callable[[], Any]:
    make_huge(tmp_path / cluster_spec.CLUSTER_FILE_NAME)
    return lambda: cluster_spec.load_cluster(tmp_path)


# Each reader, with what it must raise for a huge file.
READERS: dict[str, tuple[Callable[[Path], Callable[[], Any]], type[Exception], str]] = {
    "node config": (_huge_node_config, ConfigError, "is larger than 1048576 bytes"),
    "store CURRENT": (_store_with_huge_current, StoreCorruption, "too large to be a generation pointer"),
    "rocksdict config": (_store_with_huge_rocksdict_config, StoreCorruption, "too large"),
    "incarnation": (_huge_incarnation, incarnations.IncarnationError, "not a file this node wrote"),
    "peer incarnations": (_huge_peer_incarnations, incarnations.IncarnationError, "not a record this node wrote"),
    "migration state": (_huge_migration_state, click.UsageError, "is not a migration state of epoch 3"),
    "cluster.json (CLI)": (_huge_cluster_file_for_the_cli, click.UsageError, "larger than 1048576 bytes"),
    "cluster.json (dev cluster)": (_huge_cluster_file_for_the_dev_cluster, cluster_spec.ClusterError,
                                   "larger than 1048576 bytes"),
}


@pytest.mark.parametrize("reader", sorted(READERS))
def test_each_reader_refuses_a_huge_file_clearly_without_buffering_it(tmp_path: Path, reader: str) -> None:
    make_call, error, message = READERS[reader]
    call = make_call(tmp_path)
    with pytest.raises(error) as raised:
        call()
    assert message in str(raised.value.message if isinstance(raised.value, click.UsageError) else raised.value)
    assert peak_bytes_of(call) < PEAK_BOUND_BYTES


def test_a_huge_pid_file_is_no_pid(tmp_path: Path) -> None:
    node: Any = SimpleNamespace(pid_file=make_huge(tmp_path / "node.pid"))
    assert cluster.read_pid_file(node) is None
    assert peak_bytes_of(lambda: cluster.read_pid_file(node)) < 64 * 1024
    (tmp_path / "other.pid").write_text(f"{os.getpid()}\n")
    assert cluster.read_pid_file(SimpleNamespace(pid_file=tmp_path / "other.pid")) == os.getpid()  # type: ignore[arg-type]


# --------------------------------------------------------------------------- writing them
def _peer_incarnations_written_and_read(tmp_path: Path) -> None:
    record = incarnations.PeerIncarnations(tmp_path)
    for number in range(20):
        assert record.admit(f"n{number}", bytes([number]) * incarnations.INCARNATION_BYTES, since=number)
    again = incarnations.PeerIncarnations(tmp_path)
    assert again.known("n19") == bytes([19]) * incarnations.INCARNATION_BYTES


def _member_floors_written_and_read(tmp_path: Path) -> None:
    floors = tuple((f"member-{number}", 1_000_000 + number) for number in range(9))
    record = incarnations.MemberFloors(tmp_path)
    record.offer(floors, now=0.0)
    record.save()
    assert incarnations.MemberFloors(tmp_path).loaded == tuple(sorted(floors))


def _migration_state_written_and_read(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    cli_lifecycle._write_state(path, 3, "c" * 200, 12345, [4, 5])
    assert cli_lifecycle._read_state(path, 3) == ("c" * 200, 12345, [4, 5])


WRITERS: dict[str, tuple[Callable[[Path], None], str]] = {
    "peer incarnations": (_peer_incarnations_written_and_read, incarnations.PEER_INCARNATIONS_FILE),
    "member floors": (_member_floors_written_and_read, incarnations.MEMBER_FLOORS_FILE),
    "migration state": (_migration_state_written_and_read, "state.json"),
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_each_small_file_is_written_whole_through_short_writes_and_its_rename_made_durable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer: str) -> None:
    """A write may take fewer bytes than it was given (a disk all but full): the writer writes on until every
    byte is in. Before, one short write left a cut record, fsynced and renamed over the good one: the peer
    incarnations then stopped every later start ("not a record this node wrote"), the members' floors were set
    aside, a migration's state was refused. And the directory is fsynced after the rename that publishes the
    file (the migration state's was not)."""
    write_and_read, name = WRITERS[writer]
    real_write, real_fsync, real_replace = os.write, os.fsync, os.replace
    steps: list[str] = []

    def short_write(descriptor: int, data: Any) -> int:
        return real_write(descriptor, bytes(data)[:7])

    def noted_fsync(descriptor: int) -> None:
        steps.append("fsync directory" if os.path.isdir(f"/proc/self/fd/{descriptor}") else "fsync file")
        real_fsync(descriptor)

    def noted_replace(source: Any, destination: Any) -> None:
        steps.append(f"rename to {Path(destination).name}")
        real_replace(source, destination)

    monkeypatch.setattr(os, "write", short_write)
    monkeypatch.setattr(os, "fsync", noted_fsync)
    monkeypatch.setattr(os, "replace", noted_replace)
    write_and_read(tmp_path)
    published = steps.index(f"rename to {name}")
    assert steps[published - 1] == "fsync file" and steps[published + 1] == "fsync directory"
