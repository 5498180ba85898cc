"""Online backup and restore (tokenvault.core.backup): the endpoint, the CLI download, and restoring a data dir.

The endpoint tests serve a real BackupStream (real snapshot stream code) over a
stand-in store that writes a few checkpoint files; the restore test takes a
backup of a real node's store, restores it into a new data directory and
starts a node there.
"""

from __future__ import annotations

import asyncio
import errno
import dataclasses
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner
from structlog.testing import capture_logs

from node_support import http_client, make_configs, save_backup, start_node, wait_until
from protocol import Entry, EntryKind
from tokenvault import auth
from tokenvault.core.backup import (BACKUP_WORK_DIR_NAME, HEADER_BYTES, HEADER_INDEX, HEADER_NODE, HEADER_ROLE,
                                    HEADER_VIEW, BackupError, BackupRefused, BackupStream, restore_data_dir,
                                    verify_backup_file)
from tokenvault.cli.main import tokenvault
from tokenvault.core.commands import Actor, RotateEpochCommand, encode_command
from tokenvault.config import write_node_config
from tokenvault.api.http import HttpApp, HttpLimits, build_app, http_server
from tokenvault.metrics import Metrics
from tokenvault.core.snapshots import PendingShred, SnapshotSource, stage_file
from tokenvault.core.store import VaultStore
from tokenvault.core.wal import WriteAheadLog

ADMIN_KEY = auth.generate_api_key()
TOKENIZER_KEY = auth.generate_api_key()
KEYS = auth.ApiKeyTable([auth.ApiKeyEntry("admin", auth.hash_api_key(ADMIN_KEY), frozenset({auth.ADMIN})),
                         auth.ApiKeyEntry("tokenizer", auth.hash_api_key(TOKENIZER_KEY), frozenset({auth.TOKENIZE}))])
CHECKPOINT_FILES = {"000007.sst": os.urandom(300_000), "MANIFEST-000005": b"manifest" * 100, "empty.log": b""}
BIG_CHECKPOINT_FILES = {"000009.sst": os.urandom(6 * 1024 * 1024)}


class CheckpointingStore:
    """A store whose checkpoint is a few fixed files at (index, view), (41, 3) by default."""

    def __init__(self, files: dict[str, bytes], index: int = 41, view: int = 3) -> None:
        self.files = files
        self.index, self.view = index, view
        self.checkpoints = 0

    def create_checkpoint(self, directory: Path) -> tuple[int, int]:
        directory.mkdir(parents=True)
        for name, data in self.files.items():
            (directory / name).write_bytes(data)
        self.checkpoints += 1
        return self.index, self.view


def store_at_41_3(path: Path) -> VaultStore:
    """A real store at (41, 3): forty no-op entries, then epoch 1's rotation."""
    store = VaultStore.open(path)
    entries = [Entry(index, 3, EntryKind.NOOP, b"") for index in range(1, 41)]
    rotate = RotateEpochCommand(1, b"w" * 60, 1_000, None, None, None)
    entries.append(Entry(41, 3, EntryKind.COMMAND, encode_command(rotate)))
    store.apply_batch(entries)
    return store


@pytest.fixture(scope="module")
def real_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> CheckpointingStore:
    """The files of a real store's checkpoint at (41, 3): what the CLI's verification opens with RocksDB."""
    directory = tmp_path_factory.mktemp("real-checkpoint")
    store = store_at_41_3(directory / "store")
    try:
        assert store.create_checkpoint(directory / "checkpoint") == (41, 3)
    finally:
        store.close()
    return CheckpointingStore({path.name: path.read_bytes() for path in (directory / "checkpoint").iterdir()})


class NothingToShred:
    """A node's shredder with nothing waiting (tokenvault.core.snapshots.ShredState)."""

    pending: PendingShred | None = None

    def shred_mark(self) -> None:
        return None

    def pending_through(self, mark: None, index: int) -> PendingShred | None:
        return self.pending


class DeletesWaiting(NothingToShred):
    """A node's shredder with a delete waiting for its pass, under a sweep (no keys known)."""

    pending = PendingShred(None)


class BackupService:
    """The two service methods the backup endpoint uses."""

    def __init__(self, store: Any, work_root: Path, role: str = "primary", node_id: str = "n1",
                 shreds: NothingToShred | None = None) -> None:
        self.store, self.work_root, self.role, self.node_id = store, work_root, role, node_id
        self.shreds = shreds or NothingToShred()
        self.gate: asyncio.Event | None = None
        self.fail_midway = False

    async def read_health(self) -> dict[str, Any]:
        return {"status": "ok", "node_id": self.node_id, "role": self.role, "view": 3, "primary_id": "n1",
                "commit_index": 41, "applied_index": 41, "active_epoch": 1}

    async def open_backup(self) -> BackupStream:
        stream = await BackupStream.open(self.store, self.work_root, self.shreds)
        if self.fail_midway:
            whole = stream.chunks

            async def failing(chunk_bytes: int):  # type: ignore[no-untyped-def]
                async for chunk in whole(chunk_bytes):
                    yield chunk
                    raise OSError("the disk went away")

            stream.chunks = failing  # type: ignore[method-assign]
        if self.gate is not None:
            original = stream.chunks

            async def gated(chunk_bytes: int):  # type: ignore[no-untyped-def]
                assert self.gate is not None
                await self.gate.wait()
                async for chunk in original(chunk_bytes):
                    yield chunk

            stream.chunks = gated  # type: ignore[method-assign]
        return stream


def backup_app(service: BackupService, **limits: int) -> HttpApp:
    return build_app(service, KEYS, HttpLimits(**limits), Metrics())  # type: ignore[arg-type]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def get_when_free(client: aiohttp.ClientSession, timeout_seconds: float = 10.0) -> Any:
    """GET the backup, repeating while the node answers 503 (the previous stream still cleaning up)."""
    deadline = asyncio.get_running_loop().time() + timeout_seconds
    while True:
        response = await client.get("/v1/admin/backup", headers=bearer(ADMIN_KEY))
        await response.read()
        if response.status != 503 or asyncio.get_running_loop().time() > deadline:
            return response
        await asyncio.sleep(0.01)


def work_dirs(service: BackupService) -> list[Path]:
    return list(service.work_root.iterdir()) if service.work_root.exists() else []


# ---------------------------------------------------------------- the endpoint


async def test_backup_streams_a_verifiable_checkpoint_and_deletes_it_afterwards(tmp_path: Path) -> None:
    service = BackupService(CheckpointingStore(CHECKPOINT_FILES), tmp_path / BACKUP_WORK_DIR_NAME)
    async with http_client(backup_app(service, backup_chunk_bytes=65536)) as client:
        response = await client.get("/v1/admin/backup", headers=bearer(ADMIN_KEY))
        body = await response.read()
        await wait_until(lambda: work_dirs(service) == [], 10.0, "the checkpoint to be deleted")
    assert response.status == 200
    assert response.headers["Content-Type"] == "application/octet-stream"
    assert response.headers["Transfer-Encoding"] == "chunked"
    assert (response.headers[HEADER_INDEX], response.headers[HEADER_VIEW], response.headers[HEADER_NODE]) == \
        ("41", "3", "n1")
    assert response.headers[HEADER_ROLE] == "primary"  # what the CLI's --prefer reads
    assert int(response.headers[HEADER_BYTES]) == len(body)
    (tmp_path / "backup.bin").write_bytes(body)
    staged = stage_file(tmp_path / "backup.bin", tmp_path / "staged")
    assert (staged.index, staged.view) == (41, 3)
    assert {path.name: path.read_bytes() for path in staged.checkpoint_dir.iterdir()} == CHECKPOINT_FILES


async def test_backup_needs_the_admin_scope_and_takes_no_checkpoint_otherwise(tmp_path: Path) -> None:
    store = CheckpointingStore(CHECKPOINT_FILES)
    service = BackupService(store, tmp_path / BACKUP_WORK_DIR_NAME)
    async with http_client(backup_app(service)) as client:
        anonymous = await client.get("/v1/admin/backup")
        tokenizer = await client.get("/v1/admin/backup", headers=bearer(TOKENIZER_KEY))
        head = await client.head("/v1/admin/backup", headers=bearer(ADMIN_KEY))
    assert (anonymous.status, tokenizer.status, head.status) == (401, 403, 405)
    assert anonymous.headers["Content-Type"] == "application/problem+json"
    assert store.checkpoints == 0


async def test_a_second_backup_while_one_streams_is_503_with_retry_after(tmp_path: Path) -> None:
    service = BackupService(CheckpointingStore(CHECKPOINT_FILES), tmp_path / BACKUP_WORK_DIR_NAME)
    service.gate = asyncio.Event()
    async with http_client(backup_app(service)) as client:
        first = await client.get("/v1/admin/backup", headers=bearer(ADMIN_KEY))
        assert first.status == 200
        second = await client.get("/v1/admin/backup", headers=bearer(ADMIN_KEY))
        problem = await second.json(content_type=None)
        assert second.status == 503 and second.headers["Retry-After"] == "5"
        assert problem["type"] == "urn:tokenvault:problem:backup-busy"
        service.gate.set()
        await first.read()
        # The slot is held until the checkpoint is deleted, just after the last byte went out.
        third = await get_when_free(client)
        assert third.status == 200
    await wait_until(lambda: work_dirs(service) == [], 10.0, "the checkpoints to be deleted")


async def test_max_backup_streams_from_the_config_lets_that_many_stream_at_once(tmp_path: Path) -> None:
    """docs/api.md, [http] max_backup_streams: that many backups stream at once, one more is backup-busy."""
    from types import SimpleNamespace

    from tokenvault.config import HttpConfig, LimitsConfig, RateLimitsConfig

    config = SimpleNamespace(limits=LimitsConfig(), http=HttpConfig(max_backup_streams=2),
                             rate_limits=RateLimitsConfig())
    service = BackupService(CheckpointingStore(CHECKPOINT_FILES), tmp_path / BACKUP_WORK_DIR_NAME)
    service.gate = asyncio.Event()
    app = build_app(service, KEYS, HttpLimits.from_config(config), Metrics())  # type: ignore[arg-type]
    async with http_client(app) as client:
        first = await client.get("/v1/admin/backup", headers=bearer(ADMIN_KEY))
        second = await client.get("/v1/admin/backup", headers=bearer(ADMIN_KEY))
        assert (first.status, second.status) == (200, 200)
        third = await client.get("/v1/admin/backup", headers=bearer(ADMIN_KEY))
        assert third.status == 503 and third.headers["Retry-After"] == "5"
        service.gate.set()
        assert len(await first.read()) == len(await second.read()) == int(first.headers[HEADER_BYTES])
    await wait_until(lambda: work_dirs(service) == [], 10.0, "the checkpoints to be deleted")


async def test_a_client_that_goes_away_midway_releases_the_checkpoint(tmp_path: Path) -> None:
    service = BackupService(CheckpointingStore(BIG_CHECKPOINT_FILES), tmp_path / BACKUP_WORK_DIR_NAME)
    async with http_client(backup_app(service)) as client:
        response = await client.get("/v1/admin/backup", headers=bearer(ADMIN_KEY))
        assert response.status == 200
        await response.content.readexactly(1000)
        assert len(work_dirs(service)) == 1
        response.close()
        await wait_until(lambda: work_dirs(service) == [], 10.0, "the checkpoint to be deleted")
        # The slot is free again: another backup streams whole.
        again = await get_when_free(client)
        assert again.status == 200 and len(await again.read()) == int(again.headers[HEADER_BYTES])


async def test_a_leftover_checkpoint_of_a_dead_process_is_removed_by_the_next_backup(tmp_path: Path) -> None:
    service = BackupService(CheckpointingStore(CHECKPOINT_FILES), tmp_path / BACKUP_WORK_DIR_NAME)
    leftover = service.work_root / "backup-0123" / "source-1"
    leftover.mkdir(parents=True)
    (leftover / "000001.sst").write_bytes(b"x" * 100)
    async with http_client(backup_app(service)) as client:
        response = await client.get("/v1/admin/backup", headers=bearer(ADMIN_KEY))
        await response.read()
        assert response.status == 200
        await wait_until(lambda: work_dirs(service) == [], 10.0, "every checkpoint to be deleted")


async def test_a_stream_opened_while_another_removes_leftovers_keeps_its_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With max_backup_streams above 1, a stream may open while another's removal of dead leftovers has
    not run yet. That removal took a copy of the open streams when its own stream opened, so it deleted
    the newer stream's checkpoint as a leftover, and that stream broke off. It now asks, entry by entry,
    which streams are open then."""
    from tokenvault.core import backup as core_backup
    remove = core_backup._remove_leftovers
    removals: list[Path] = []
    first_may_go = threading.Event()

    def first_waits(work_root: Path, is_active: Any) -> None:
        removals.append(work_root)
        if len(removals) == 1:
            first_may_go.wait(10.0)
        remove(work_root, is_active)
    monkeypatch.setattr(core_backup, "_remove_leftovers", first_waits)
    store, root = CheckpointingStore(CHECKPOINT_FILES), tmp_path / BACKUP_WORK_DIR_NAME
    first = asyncio.create_task(BackupStream.open(store, root, NothingToShred()))
    await wait_until(lambda: len(removals) == 1, 5.0, "the first stream's removal of leftovers to start")
    second = await BackupStream.open(store, root, NothingToShred())
    first_may_go.set()
    opened = await first
    try:
        for stream in (second, opened):
            assert len(b"".join([chunk async for chunk in stream.chunks()])) == stream.total_bytes
    finally:
        await second.close()
        await opened.close()
    assert list(root.iterdir()) == []


async def test_a_checkpoint_left_by_a_node_killed_mid_backup_is_removed_when_it_starts_again(tmp_path: Path) -> None:
    """A stream's checkpoint hard-links the store's table files, so one left by a node killed mid-stream kept
    the bytes of every row deleted (or epoch secret destroyed) and shredded since, in the data directory,
    until some later backup happened to open a stream: on the code before it outlived the node's restart."""
    config, = make_configs(tmp_path, 1)
    leftover = config.data_dir / BACKUP_WORK_DIR_NAME / "backup-0123" / "source-1"
    leftover.mkdir(parents=True)
    (leftover / "000001.sst").write_bytes(b"rows deleted since this checkpoint was taken")
    running = await start_node(config)
    try:
        assert not (config.data_dir / BACKUP_WORK_DIR_NAME).exists()
    finally:
        await running.close()


async def test_backup_leftovers_a_node_cannot_remove_at_its_start_are_said(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What cannot be removed (a read-only mount, a file the node may not delete) is logged once with what is
    left, since it may hold rows shredded since; before, the removal ignored its errors without a word."""
    from tokenvault.core import node as node_module
    config, = make_configs(tmp_path, 1)
    leftover = config.data_dir / BACKUP_WORK_DIR_NAME / "backup-0123" / "source-1"
    leftover.mkdir(parents=True)
    (leftover / "000001.sst").write_bytes(b"rows deleted since this checkpoint was taken")
    monkeypatch.setattr(node_module.shutil, "rmtree", lambda path, ignore_errors=False: None)  # removes nothing
    with capture_logs() as logs:
        running = await start_node(config)
        await running.close()
    (said,) = [entry for entry in logs if entry["event"] == "node.backup_leftovers_not_removed"]
    assert said["log_level"] == "warning" and said["entries"] == 3
    assert said["directory"] == str(config.data_dir / BACKUP_WORK_DIR_NAME)


# ---------------------------------------------------------------- the CLI download


class ThreadedServer:
    """The backup app served on 127.0.0.1:0 from its own thread, for the synchronous CliRunner."""

    def __init__(self, service: BackupService) -> None:
        self.service = service
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.url = ""

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        server = http_server(backup_app(self.service))

        async def start() -> None:
            await server.start("127.0.0.1", 0)
            host, port = server.addresses[0][:2]
            self.url = f"http://{host}:{port}"

        self.loop.run_until_complete(start())
        self.ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(server.close(0))
        self.loop.close()

    def __enter__(self) -> ThreadedServer:
        self.thread.start()
        assert self.ready.wait(10)
        return self

    def __exit__(self, *exception_info: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    for name in ("TOKENVAULT_URL", "TOKENVAULT_API_KEY", "TOKENVAULT_CLUSTER_JSON"):
        monkeypatch.delenv(name, raising=False)
    return CliRunner()


@pytest.fixture
def two_nodes(tmp_path: Path, real_checkpoint: CheckpointingStore) -> Iterator[tuple[ThreadedServer, ThreadedServer]]:
    store = real_checkpoint
    backup = BackupService(store, tmp_path / "n2" / BACKUP_WORK_DIR_NAME, role="backup", node_id="n2")
    primary = BackupService(store, tmp_path / "n1" / BACKUP_WORK_DIR_NAME, role="primary", node_id="n1")
    with ThreadedServer(backup) as backup_server, ThreadedServer(primary) as primary_server:
        yield backup_server, primary_server


def test_cli_backup_prefers_the_primary_verifies_and_renames(
        runner: CliRunner, two_nodes: tuple[ThreadedServer, ThreadedServer], tmp_path: Path) -> None:
    backup_server, primary_server = two_nodes
    out = tmp_path / "vault.backup"
    result = runner.invoke(tokenvault, ["admin", "backup", "--url", f"{backup_server.url},{primary_server.url}",
                                        "--api-key", ADMIN_KEY, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "backup of n1 (primary) at index 41, view 3" in result.stdout
    assert ADMIN_KEY not in result.output
    assert out.exists() and not out.with_name(out.name + ".partial").exists()
    assert verify_backup_file(out).index == 41
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".tokenvault")] == []
    again = runner.invoke(tokenvault, ["admin", "backup", "--url", primary_server.url, "--api-key", ADMIN_KEY,
                                       "--out", str(out)])
    assert again.exit_code == 1 and "exists already" in again.output


class KeysWaiting(NothingToShred):
    """A node's shredder with a delete's two rows waiting for a pass by key ranges (their keys known)."""

    pending = PendingShred((b"LTtv1_a", b"Ttv1_a"))


@pytest.mark.parametrize("failing", ["replace", "fsync_directory"])
def test_cli_backup_whose_rename_or_directory_sync_fails_says_so_without_a_traceback(
        runner: CliRunner, two_nodes: tuple[ThreadedServer, ThreadedServer], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, failing: str) -> None:
    """The last two steps of a download, the rename of FILE.partial and the sync of its directory, failing
    (a full or read-only file system): a clear error and exit 1, never a traceback, and no FILE.partial
    left behind. Before, both ended in an OSError's traceback."""
    from tokenvault.cli import backup as cli_backup

    def refuse(*args: object) -> None:
        raise OSError(errno.EIO, "Input/output error")
    if failing == "replace":
        monkeypatch.setattr(cli_backup.os, "replace", refuse)
    else:
        monkeypatch.setattr(cli_backup, "fsync_directory", refuse)
    _, primary_server = two_nodes
    out = tmp_path / "vault.backup"
    result = runner.invoke(tokenvault, ["admin", "backup", "--url", primary_server.url, "--api-key", ADMIN_KEY,
                                        "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Input/output error" in result.output
    assert not out.with_name(out.name + ".partial").exists()
    assert out.exists() is (failing == "fsync_directory"), "kept once renamed, and said so"


@pytest.mark.parametrize(("shreds", "pending", "keys"), [(NothingToShred(), False, None),
                                                         (DeletesWaiting(), True, None),
                                                         (KeysWaiting(), True, 2)],
                         ids=["shredded", "deletes-waiting", "keys-waiting"])
def test_cli_backup_says_whether_the_backup_may_hold_rows_deleted_and_not_yet_shredded(
        runner: CliRunner, real_checkpoint: CheckpointingStore, tmp_path: Path, shreds: NothingToShred,
        pending: bool, keys: int | None) -> None:
    """docs/api.md, backup: the manifest's shred_pending, from the node's shredder, and how many keys of
    those rows it lists (shred_keys), in the summary and --json."""
    service = BackupService(real_checkpoint, tmp_path / "n1" / BACKUP_WORK_DIR_NAME, shreds=shreds)
    with ThreadedServer(service) as server:
        for number, extra in enumerate(([], ["--json"])):
            result = runner.invoke(tokenvault, ["admin", "backup", "--url", server.url, "--api-key", ADMIN_KEY,
                                                "--out", str(tmp_path / f"{number}.backup"), *extra])
            assert result.exit_code == 0, result.output
            if extra:
                summary = json.loads(result.stdout.splitlines()[-1])
                assert (summary["shred_pending"], summary["shred_keys"]) == (pending, keys)
            else:
                assert ("not shredded yet" in result.stdout) is pending
                assert ("the rows of 2 keys it lists" in result.stdout) is (keys is not None)
    verified = verify_backup_file(tmp_path / "0.backup")
    assert (verified.pending_shred is not None) is pending
    assert (verified.pending_shred and verified.pending_shred.key_count) == keys


def test_cli_backup_from_a_backup_node_when_asked(
        runner: CliRunner, two_nodes: tuple[ThreadedServer, ThreadedServer], tmp_path: Path) -> None:
    backup_server, primary_server = two_nodes
    out = tmp_path / "vault.backup"
    result = runner.invoke(tokenvault, ["admin", "backup", "--url", f"{primary_server.url},{backup_server.url}",
                                        "--api-key", ADMIN_KEY, "--out", str(out), "--prefer", "backup", "--json"])
    assert result.exit_code == 0, result.output
    # The last line: the in-process servers' own log lines go to stdout too.
    document = json.loads(result.stdout.splitlines()[-1])
    assert (document["node_id"], document["role"], document["index"]) == ("n2", "backup", 41)
    assert document["bytes"] == out.stat().st_size


def test_cli_backup_with_a_key_lacking_admin_scope_fails_without_a_file(
        runner: CliRunner, two_nodes: tuple[ThreadedServer, ThreadedServer], tmp_path: Path) -> None:
    _, primary_server = two_nodes
    out = tmp_path / "vault.backup"
    result = runner.invoke(tokenvault, ["admin", "backup", "--url", primary_server.url, "--api-key", TOKENIZER_KEY,
                                        "--out", str(out)])
    assert result.exit_code == 1 and "403" in result.output
    assert TOKENIZER_KEY not in result.output
    assert list(tmp_path.glob("vault.backup*")) == []


def test_cli_backup_refuses_a_whole_stream_whose_checkpoint_is_no_store(runner: CliRunner, tmp_path: Path) -> None:
    service = BackupService(CheckpointingStore(CHECKPOINT_FILES), tmp_path / BACKUP_WORK_DIR_NAME)
    out = tmp_path / "vault.backup"
    with ThreadedServer(service) as server:
        result = runner.invoke(tokenvault, ["admin", "backup", "--url", server.url, "--api-key", ADMIN_KEY,
                                            "--out", str(out)])
    assert result.exit_code == 1 and "is refused" in result.output and "RocksDB" in result.output
    assert "Traceback" not in result.output
    assert list(tmp_path.glob("vault.backup*")) == []


async def test_a_failure_midway_breaks_the_transfer_instead_of_ending_it(tmp_path: Path) -> None:
    service = BackupService(CheckpointingStore(BIG_CHECKPOINT_FILES), tmp_path / BACKUP_WORK_DIR_NAME)
    service.fail_midway = True
    async with http_client(backup_app(service)) as client:
        response = await client.get("/v1/admin/backup", headers=bearer(ADMIN_KEY))
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    await wait_until(lambda: work_dirs(service) == [], 10.0, "the checkpoint to be deleted")


def test_cli_backup_of_a_stream_that_breaks_off_keeps_nothing(runner: CliRunner, tmp_path: Path) -> None:
    service = BackupService(CheckpointingStore(BIG_CHECKPOINT_FILES), tmp_path / BACKUP_WORK_DIR_NAME)
    service.fail_midway = True
    out = tmp_path / "vault.backup"
    with ThreadedServer(service) as server:
        result = runner.invoke(tokenvault, ["admin", "backup", "--url", server.url, "--api-key", ADMIN_KEY,
                                            "--out", str(out)])
    assert result.exit_code == 1 and "broke off" in result.output and "Traceback" not in result.output
    assert list(tmp_path.glob("vault.backup*")) == []


# ---------------------------------------------------------------- refusing bad backups and data dirs


@pytest.fixture
def backup_file(tmp_path: Path) -> Path:
    from tokenvault.core.snapshots import take_checkpoint

    source = SnapshotSource.from_checkpoint(*take_checkpoint(CheckpointingStore(CHECKPOINT_FILES), tmp_path / "work"),
                                            None)
    path = tmp_path / "good.backup"
    with open(path, "wb") as handle:
        source.write_to(handle)
    source.close()
    return path


@pytest.fixture
def node_config(tmp_path: Path) -> Path:
    config = make_configs(tmp_path / "restored", 1)[0]
    path = tmp_path / "node.toml"
    write_node_config(path, config)
    return path


def damaged_copy(backup_file: Path, change: Any) -> Path:
    data = bytearray(backup_file.read_bytes())
    damaged = backup_file.with_name("damaged.backup")
    damaged.write_bytes(bytes(change(data)))
    return damaged


def flip(position: int) -> Any:
    def change(data: bytearray) -> bytearray:
        data[position % len(data)] ^= 0x01
        return data
    return change


@pytest.mark.parametrize("change, reason", [
    (lambda data: data[:len(data) // 2], "ended early"),
    (lambda data: data[:-1], "ended early"),
    (flip(20), "manifest"),
    (flip(200_000), "does not match its digest"),
    (flip(-1), "trailing digest"),
    (lambda data: b"not a backup at all" + data, "bad magic"),
], ids=["half", "last-byte-cut", "manifest-byte", "file-byte", "trailer-byte", "garbage"])
def test_a_truncated_or_altered_backup_is_refused_and_writes_nothing(
        runner: CliRunner, backup_file: Path, node_config: Path, tmp_path: Path, change: Any, reason: str) -> None:
    damaged = damaged_copy(backup_file, change)
    with pytest.raises(BackupRefused, match=reason):
        verify_backup_file(damaged)
    result = runner.invoke(tokenvault, ["admin", "restore", "--backup", str(damaged), "--config", str(node_config)])
    assert result.exit_code == 1
    assert "is refused" in result.output and reason in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "restored" / "n1" / "data").exists()
    assert [path.name for path in (tmp_path / "restored" / "n1").glob(".*")] == []


def test_a_non_empty_data_dir_is_refused_untouched(runner: CliRunner, backup_file: Path, node_config: Path,
                                                   tmp_path: Path) -> None:
    data_dir = tmp_path / "restored" / "n1" / "data"
    data_dir.mkdir(parents=True)
    (data_dir / "precious").write_text("keep me")
    result = runner.invoke(tokenvault, ["admin", "restore", "--backup", str(backup_file),
                                        "--config", str(node_config)])
    assert result.exit_code == 1
    assert "is not empty" in result.output and "Traceback" not in result.output
    assert [path.name for path in data_dir.iterdir()] == ["precious"]


@pytest.mark.parametrize("pending", [None, PendingShred(None), PendingShred((b"Ttv1_a", b"Ttv1_b"))],
                         ids=["shredded", "deletes-waiting", "keys-listed"])
def test_cli_restore_of_a_backup_holding_rows_not_yet_shredded_records_the_pass_it_needs(
        runner: CliRunner, tmp_path: Path, pending: PendingShred | None) -> None:
    """docs/api.md, backup: a restore from a backup whose manifest says shred_pending writes SHRED-WHOLE (the
    node's first shred pass compacts its whole store), or SHRED-KEYS where the manifest lists the keys (a
    pass of their ranges), and says so; from one that does not, neither."""
    from tokenvault.core.shred import read_shred_keys
    from tokenvault.core.snapshots import take_checkpoint
    from tokenvault.crypto.keys import new_epoch_secret

    config = make_configs(tmp_path / "restored", 1)[0]
    store = VaultStore.open(tmp_path / "source")
    wrapped = config.load_master_key().wrap_epoch_secret(1, new_epoch_secret())
    store.apply_batch([Entry(1, 1, EntryKind.COMMAND,
                             encode_command(RotateEpochCommand(1, wrapped, 1_000, None, None, None)))])
    backup = tmp_path / "taken.backup"
    source = SnapshotSource.from_checkpoint(*take_checkpoint(store, tmp_path / "work"), pending)
    with open(backup, "wb") as handle:
        source.write_to(handle)
    source.close()
    store.close()
    result = restore_with_cli(runner, backup, config, tmp_path)
    assert result.exit_code == 0, result.output
    whole = pending is not None and pending.keys is None
    assert ("compacts its whole store" in result.output) is whole
    assert (config.data_dir / "SHRED-WHOLE").exists() is whole
    if pending is not None and pending.keys is not None:
        assert "compacts the ranges of the 2 keys the backup lists" in result.output
        assert read_shred_keys(config.data_dir) == (1, pending.keys)
    else:
        assert read_shred_keys(config.data_dir) is None


def test_a_missing_backup_file_is_a_clear_error(runner: CliRunner, node_config: Path, tmp_path: Path) -> None:
    result = runner.invoke(tokenvault, ["admin", "restore", "--backup", str(tmp_path / "nope"),
                                        "--config", str(node_config)])
    assert result.exit_code == 1 and "does not exist" in result.output


def test_a_data_directory_whose_parent_cannot_be_made_is_a_clear_error(
        runner: CliRunner, backup_file: Path, tmp_path: Path) -> None:
    """The parent of the data directory is made when missing; one that cannot be (a file stands where a directory
    of the path should) ended the restore with a traceback on the code before."""
    (tmp_path / "blocked").write_text("a file, not a directory")
    config = dataclasses.replace(make_configs(tmp_path / "restored", 1)[0],
                                 data_dir=tmp_path / "blocked" / "n1" / "data")
    result = restore_with_cli(runner, backup_file, config, tmp_path)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"cannot create {tmp_path / 'blocked' / 'n1'}, the data directory's parent" in result.output
    assert (tmp_path / "blocked").read_text() == "a file, not a directory"


def test_a_restore_whose_last_directory_sync_fails_says_the_data_directory_is_in_place(
        runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The data directory renamed into place, the sync of its parent failing (a failing disk): the error says
    the data directory is restored and to sync before starting. It said it could not be built, and a retry
    then found the directory not empty."""
    from tokenvault.core import backup as core_backup
    config = make_configs(tmp_path / "restored", 1)[0]
    data_dir = Path(config.data_dir).absolute()
    synced = core_backup.fsync_directory

    def failing_once_in_place(path: Path) -> None:
        if Path(path) == data_dir.parent and (data_dir / "store").exists():
            raise OSError(errno.EIO, "Input/output error")
        synced(path)
    backup = real_backup(tmp_path, tmp_path / "taken.backup")
    monkeypatch.setattr(core_backup, "fsync_directory", failing_once_in_place)
    result = restore_with_cli(runner, backup, config, tmp_path)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"is restored in {data_dir}" in result.output and "Input/output error" in result.output
    assert (data_dir / "store").is_dir() and (data_dir / "wal").is_dir()


def restore_with_cli(runner: CliRunner, backup: Path, config: Any, tmp_path: Path) -> Any:
    """``tokenvault admin restore`` of ``backup`` into the node ``config`` describes (written to tmp_path)."""
    node_toml = tmp_path / "node.toml"
    write_node_config(node_toml, config)
    return runner.invoke(tokenvault, ["admin", "restore", "--backup", str(backup), "--config", str(node_toml)])


def real_backup(tmp_path: Path, path: Path) -> Path:
    """A backup file of an empty real store at ``path``."""
    from tokenvault.core.snapshots import take_checkpoint

    store = VaultStore.open(tmp_path / "source")
    source = SnapshotSource.from_checkpoint(*take_checkpoint(store, tmp_path / "work"), None)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        source.write_to(handle)
    source.close()
    store.close()
    return path


def test_a_staged_copy_left_by_a_killed_verification_is_removed_by_the_next_run_and_a_live_one_is_kept(
        tmp_path: Path) -> None:
    """`tokenvault admin backup` stages a whole copy of the backup in a hidden directory beside FILE to verify
    it. A run killed meanwhile (cron's timeout sends SIGTERM, which runs no finally; kill -9; a crash) leaves
    that copy; the next run removes it (its lock died with its process), or each killed run would add a
    store-sized hidden directory for good. The copy of a verification still running is left alone."""
    import signal
    import subprocess
    import sys
    import time

    backup = real_backup(tmp_path, tmp_path / "backups" / "vault.backup.partial")
    script = ("import sys, time\n"
              "from pathlib import Path\n"
              "from tokenvault.core import backup\n"
              "backup.VaultStore.verify_checkpoint = staticmethod(lambda *a: time.sleep(60))\n"
              "backup.verify_backup_file(Path(sys.argv[1]))\n")
    staged = ".tokenvault-restore-*/staged/checkpoint/CURRENT"
    children: list[subprocess.Popen[bytes]] = []
    copies: list[set[Path]] = []
    try:
        for count in (1, 2):  # the first is killed, the second still runs
            children.append(subprocess.Popen([sys.executable, "-c", script, str(backup)],
                                             cwd=Path(__file__).parents[2]))
            deadline = time.monotonic() + 30
            while len(list(backup.parent.glob(staged))) < count:
                assert time.monotonic() < deadline and children[-1].poll() is None
                time.sleep(0.05)
            copies.append({path.parents[2] for path in backup.parent.glob(staged)} - set().union(*copies))
        children[0].send_signal(signal.SIGTERM)
        children[0].wait()
        verify_backup_file(backup)  # the next run
        assert set(backup.parent.glob(".tokenvault-restore-*")) == copies[1], \
            "the killed run's copy is gone, the running one's is kept"
        assert all((copy / "staged" / "checkpoint" / "CURRENT").exists() for copy in copies[1])
    finally:
        for child in children:
            child.kill()
            child.wait()
    verify_backup_file(backup)
    assert list(backup.parent.glob(".tokenvault-restore-*")) == []


def test_a_data_directory_left_half_built_by_a_killed_restore_is_removed_by_the_next_restore(
        tmp_path: Path) -> None:
    """A restore builds the data directory beside it (`.<name>.restoring-*`, as large as the store) and renames
    it into place; one killed meanwhile leaves it, and the next restore into that parent removes it."""
    config = make_configs(tmp_path / "restored", 1)[0]
    backup = real_backup(tmp_path, tmp_path / "taken.backup")
    data_dir = Path(config.data_dir).absolute()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    leftovers = [data_dir.parent / f".{data_dir.name}.restoring-dead", data_dir.parent / ".tokenvault-restore-dead"]
    for leftover in leftovers:
        (leftover / "store").mkdir(parents=True)
        (leftover / "store" / "000007.sst").write_bytes(b"rows of a killed restore")
    other_node = data_dir.parent / ".other.restoring-dead"  # another data directory's: not this restore's
    other_node.mkdir()
    restore_data_dir(backup, config)
    assert not any(leftover.exists() for leftover in leftovers)
    assert other_node.exists()
    assert [path.name for path in data_dir.parent.glob(".*")] == [other_node.name]


def test_a_backup_whose_checkpoint_holds_a_rocksdb_wal_over_the_bound_is_refused_unopened(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A backup file is hostile until verified: opening its checkpoint would replay every RocksDB WAL file
    (`*.log`) into memory (a multi-GB one would run `tokenvault admin backup`'s verification, or `admin
    restore`, out of memory). One whose WAL files hold more than a checkpoint may (the store's memtables; 1 MiB
    here) is refused as a damaged backup is, and nothing is written."""
    from tokenvault.core import store_files
    from tokenvault.core.snapshots import take_checkpoint

    monkeypatch.setattr(store_files, "MAX_CHECKPOINT_WAL_BYTES", 1 << 20, raising=False)
    store = VaultStore.open(tmp_path / "source")
    directory, index, view = take_checkpoint(store, tmp_path / "work")
    store.close()
    (directory / "999999.log").write_bytes(os.urandom((1 << 20) + 1))
    source = SnapshotSource.from_checkpoint(directory, index, view, None)
    backup = tmp_path / "hostile.backup"
    with open(backup, "wb") as handle:
        source.write_to(handle)
    source.close()
    with pytest.raises(BackupRefused, match=r"is refused: .*WAL files .* more than the 1048576 bytes"):
        verify_backup_file(backup)
    config = make_configs(tmp_path / "restored", 1)[0]
    with pytest.raises(BackupRefused, match="WAL files"):
        restore_data_dir(backup, config)
    assert not config.data_dir.exists()
    assert [path.name for path in tmp_path.glob(".*")] == []
    assert [path.name for path in config.data_dir.parent.glob(".*")] == []


@pytest.mark.parametrize("index", [2**63, 2**64 - 1], ids=["2**63", "2**64-1"])
def test_a_backup_at_an_index_past_what_the_log_holds_is_refused_at_verification_with_a_clear_error(
        runner: CliRunner, tmp_path: Path, index: int) -> None:
    """A backup whose manifest and store meta agree on an index of 2**63 or more (msgpack holds up to 2**64 - 1)
    passed verification, and `admin restore` then died on a traceback from the replication log, which holds
    indexes up to 2**63 - 1 (checked on the code before). Both records are bounded where they are decoded."""
    from rocksdict import Options, Rdict

    from tokenvault.core.snapshots import take_checkpoint
    from tokenvault.core.store_layout import META_KEY, StoreError, decode_meta, encode_meta

    store = VaultStore.open(tmp_path / "source")
    directory, _, view = take_checkpoint(store, tmp_path / "work")
    store.close()
    database = Rdict(str(directory), Options(raw_mode=True))
    _, _, token_count = decode_meta(database[META_KEY], StoreError)
    database[META_KEY] = encode_meta(index, view, token_count)
    database.close()
    source = SnapshotSource.from_checkpoint(directory, index, view, None)
    backup = tmp_path / "past.backup"
    with open(backup, "wb") as handle:
        source.write_to(handle)
    source.close()
    with pytest.raises(BackupRefused, match="manifest index, view or time is not an integer from 0 to "
                                            "9223372036854775807"):
        verify_backup_file(backup)
    config = make_configs(tmp_path / "restored", 1)[0]
    result = restore_with_cli(runner, backup, config, tmp_path)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "is refused" in result.output and "9223372036854775807" in result.output
    assert not config.data_dir.exists()
    assert [path.name for path in config.data_dir.parent.glob(".*")] == []


def test_a_value_error_while_building_the_data_directory_is_a_backup_error_and_leaves_nothing(
        runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What verification lets through and the store or the log still refuses with a ValueError (the log's
    "hard state fields are out of range" was one) is a BackupError, which the CLI prints as one line with exit 1,
    not a traceback (checked on the code before)."""
    from tokenvault.core import backup as backup_module

    def refuse(*arguments: Any) -> None:
        raise ValueError("hard state fields are out of range")

    monkeypatch.setattr(backup_module, "_start_log_after", refuse)
    backup = real_backup(tmp_path, tmp_path / "taken.backup")
    config = make_configs(tmp_path / "restored", 1)[0]
    with pytest.raises(BackupError, match="cannot build the data directory of n1 from this backup: hard state"):
        restore_data_dir(backup, config)
    result = restore_with_cli(runner, backup, config, tmp_path)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "error: cannot build the data directory of n1 from this backup" in result.output
    assert "Traceback" not in result.output
    assert not config.data_dir.exists()
    assert [path.name for path in config.data_dir.parent.glob(".*")] == []


# ---------------------------------------------------------------- restoring a real store


async def test_a_data_dir_restored_from_a_real_store_serves_every_token(tmp_path: Path) -> None:
    source_config, = make_configs(tmp_path / "source", 1)
    running = await start_node(source_config)
    try:
        await wait_until(lambda: running.node.store.active_epoch() >= 1, 10.0, "epoch 1")
        values = [f"4111-{number:012d}" for number in range(300)]
        tokens: list[str] = []
        for start in range(0, len(values), 100):
            outcome = await running.service.tokenize("admin", values[start:start + 100], None)
            tokens += json.loads(outcome.body)["tokens"]
        await running.service.rotate_epoch("admin", None)
        later = await running.service.tokenize("admin", ["after-rotation"], None)
        tokens += json.loads(later.body)["tokens"]
        values.append("after-rotation")
        # The source cluster's configuration changed (a learner it will never feed): it must not follow
        # the backup into the restored cluster, whose members are its own node configs'.
        await running.node.change_membership(lambda current: current.with_learner("n9", "127.0.0.1:9"), 5.0)
        assert running.node.store.membership().learners == ("n9",)
        path = tmp_path / "real.backup"
        index, view = await save_backup(running, path)
        assert index >= 5 and list((source_config.data_dir / BACKUP_WORK_DIR_NAME).iterdir()) == []
    finally:
        await running.close()

    # What admin backup's summary says of it (the count was never filled in before: None).
    assert verify_backup_file(path).token_count == 301
    target = dataclasses.replace(source_config, data_dir=tmp_path / "target" / "data")
    restored = restore_data_dir(path, target)
    assert (restored.index, restored.view, restored.epochs, restored.token_count) == (index, view, 2, 301)
    with pytest.raises(BackupError, match="not empty"):
        restore_data_dir(path, target)
    wal, recovered = WriteAheadLog.open(target.data_dir / "wal")
    wal.close()
    assert (recovered.base_index, recovered.base_view, recovered.entries) == (index, view, ())
    assert recovered.hard_state is not None and recovered.hard_state.view >= view
    assert recovered.hard_state.commit_index == index

    running = await start_node(target)
    try:
        await wait_until(lambda: running.is_primary() and running.node.store.applied_index > index, 10.0,
                         "the restored node to lead and commit in a new view")
        assert await running.service.detokenize(tokens) == values
        assert running.node.store.active_epoch() == 2
        assert running.node.store.membership() is None
        assert running.node.replica.membership.voters == ("n1",) and running.node.replica.membership.learners == ()
    finally:
        await running.close()


async def test_a_backup_of_a_cluster_that_destroyed_an_epoch_restores_and_serves_the_live_ones(
        tmp_path: Path) -> None:
    """A destroyed epoch keeps its record with no secret: the restore's key check tried to open it and
    refused every backup taken after a destroy, blaming the master key (checked on the code before)."""
    source_config, = make_configs(tmp_path / "source", 1)
    running = await start_node(source_config)
    try:
        await wait_until(lambda: running.node.store.active_epoch() >= 1, 10.0, "epoch 1")
        (old,) = json.loads((await running.service.tokenize("admin", ["old-epoch"], None)).body)["tokens"]
        await running.service.rotate_epoch("admin", None)
        (kept,) = json.loads((await running.service.tokenize("admin", ["kept"], None)).body)["tokens"]
        await running.service.destroy_epoch(1, Actor(name="admin", node="n1", request_id="r"))
        path = tmp_path / "after-destroy.backup"
        await save_backup(running, path)
    finally:
        await running.close()
    target = dataclasses.replace(source_config, data_dir=tmp_path / "target" / "data")
    assert restore_data_dir(path, target).epochs == 2
    running = await start_node(target)
    try:
        await wait_until(running.is_primary, 10.0, "the restored node to lead")
        assert await running.service.detokenize([old, kept]) == [None, "kept"]
    finally:
        await running.close()


async def test_a_backup_under_another_master_key_is_refused(tmp_path: Path) -> None:
    source_config, = make_configs(tmp_path / "source", 1)
    running = await start_node(source_config)
    try:
        await wait_until(lambda: running.node.store.active_epoch() >= 1, 10.0, "epoch 1")
        path = tmp_path / "real.backup"
        await save_backup(running, path)
    finally:
        await running.close()
    other, = make_configs(tmp_path / "other", 1)
    with pytest.raises(BackupError, match="master key does not open"):
        restore_data_dir(path, other)
    assert not other.data_dir.exists()


# ---------------------------------------------------------------- the log events docs/api.md names


def backup_events(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["event"].startswith("backup.")]


async def test_each_end_of_a_backup_stream_is_logged_as_docs_api_md_names_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/api.md, backup: `backup.started`, then `backup.finished` for a whole stream, `backup.aborted`
    (client gone) when the client leaves before the end, `backup.failed` when the stream fails midway;
    `backup.close_failed` when the checkpoint cannot be closed afterwards. Errors by their type only."""
    service = BackupService(CheckpointingStore(BIG_CHECKPOINT_FILES), tmp_path / BACKUP_WORK_DIR_NAME)

    def refusing_close(self: SnapshotSource) -> None:
        raise PermissionError(13, "Permission denied", "/secret/checkpoint/path")

    async def stream_ended(count: int) -> list[dict[str, Any]]:
        """The events of the last stream once it logged ``count`` of them and its checkpoint is gone."""
        await wait_until(lambda: len(backup_events(logs)) == seen + count, 10.0, "the stream's events")
        await wait_until(lambda: work_dirs(service) == [], 10.0, "the checkpoint to be deleted")
        return backup_events(logs)[seen:]

    with capture_logs() as logs:
        async with http_client(backup_app(service)) as client:
            seen = 0
            response = await client.get("/v1/admin/backup", headers=bearer(ADMIN_KEY))
            total = len(await response.read())
            assert response.status == 200 and total == int(response.headers[HEADER_BYTES])
            whole = await stream_ended(2)
            assert [(entry["event"], entry["log_level"]) for entry in whole] == [
                ("backup.started", "info"), ("backup.finished", "info")]
            assert (whole[0]["index"], whole[0]["view"], whole[0]["bytes"]) == (41, 3, total)
            assert (whole[1]["index"], whole[1]["bytes"]) == (41, total) and whole[1]["seconds"] >= 0

            seen += len(whole)
            service.gate = asyncio.Event()  # the stream waits before its first chunk
            leaving = await client.get("/v1/admin/backup", headers=bearer(ADMIN_KEY))
            assert leaving.status == 200
            leaving.close()  # the client goes away before any of the body was sent
            service.gate.set()
            gone = await stream_ended(2)
            service.gate = None
            assert [(entry["event"], entry["log_level"]) for entry in gone] == [
                ("backup.started", "info"), ("backup.aborted", "warning")]
            assert (gone[1]["reason"], gone[1]["bytes"]) == ("client gone", total)
            assert 0 <= gone[1]["sent_bytes"] < total

            seen += len(gone)
            service.fail_midway = True
            response = await client.get("/v1/admin/backup", headers=bearer(ADMIN_KEY))
            assert response.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()
            failing = await stream_ended(2)
            service.fail_midway = False
            assert [(entry["event"], entry["log_level"]) for entry in failing] == [
                ("backup.started", "info"), ("backup.failed", "error")]
            assert failing[1]["error_type"] == "OSError" and 0 < failing[1]["sent_bytes"] < total

            seen += len(failing)
            monkeypatch.setattr(SnapshotSource, "close", refusing_close)
            response = await client.get("/v1/admin/backup", headers=bearer(ADMIN_KEY))
            assert response.status == 200 and len(await response.read()) == total
            unclosed = await stream_ended(3)
            assert [(entry["event"], entry["log_level"]) for entry in unclosed] == [
                ("backup.started", "info"), ("backup.finished", "info"), ("backup.close_failed", "warning")]
            assert unclosed[2]["error_type"] == "PermissionError"
    said = repr(backup_events(logs))
    assert not any(message in said for message in ("the disk went away", "Permission denied", "/secret/"))
