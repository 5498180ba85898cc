"""The core's answers to its workers (tokenvault.api.core_calls): what a worker holds open in the core
(its backup streams) belongs to its channel."""

from __future__ import annotations

import asyncio
import json
import threading
from types import SimpleNamespace
from typing import Any, cast

import pytest

from node_support import RunningNode, wait_until
from test_channel import pair
from tokenvault.api.core_calls import MAX_READ_POINTS_IN_FLIGHT, CoreCalls
from tokenvault.api.remote import RemoteService
from tokenvault.core import backup
from tokenvault.core.backup import BackupBusy
from tokenvault.config import LimitsConfig
from tokenvault.core import commands
from tokenvault.errors import MembershipChangeRefused, NotFound, Overloaded, ServiceError
from tokenvault.metrics import Metrics


def core_calls(node: RunningNode) -> CoreCalls:
    return CoreCalls(node.service, node.node.metrics, lambda: [], max_backup_streams=1)


async def test_a_backup_stream_is_closed_with_the_channel_of_the_worker_that_opened_it(single: RunningNode) -> None:
    """A worker killed mid-backup: its channel closes, and so does its stream in the core, else every later
    backup of the node (one stream at a time by default) is 503 backup-busy until the core restarts."""
    calls = core_calls(single)
    core, channel = await pair(calls.handlers)
    await RemoteService(single.node_id, channel).open_backup()
    await channel.close()  # the worker is SIGKILLed mid-stream
    await asyncio.wait_for(core.closed.wait(), 5)
    await wait_until(lambda: calls.backup_streams_open == 0, 5.0, "the stream's checkpoint to be removed")
    successor_core, successor_channel = await pair(calls.handlers)  # its successor's channel
    try:
        stream = await RemoteService(single.node_id, successor_channel).open_backup()
        await stream.close()
    finally:
        await successor_core.close()
        await successor_channel.close()
        await calls.close_backups()


async def test_a_stream_closed_behind_its_gone_worker_holds_its_place_until_its_checkpoint_is_removed(
        single: RunningNode, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/api.md, max_backup_streams: each stream holds a checkpoint of the store on disk, so one whose
    worker died keeps its place until its checkpoint is gone; before, the place was free at once and a
    second checkpoint could be taken beside the first one still being removed."""
    calls = core_calls(single)
    removing, finish = threading.Event(), threading.Event()
    discard_files = backup._discard_files

    def held_discard(source: Any, work_dir: Any) -> None:
        removing.set()
        finish.wait(10)
        discard_files(source, work_dir)

    monkeypatch.setattr(backup, "_discard_files", held_discard)
    core, channel = await pair(calls.handlers)
    successor_core, successor_channel = await pair(calls.handlers)
    try:
        await RemoteService(single.node_id, channel).open_backup()
        await channel.close()  # the worker is SIGKILLed mid-stream
        await asyncio.wait_for(core.closed.wait(), 5)
        await asyncio.wait_for(asyncio.to_thread(removing.wait, 5), 6)
        successor = RemoteService(single.node_id, successor_channel)
        with pytest.raises(BackupBusy):
            await successor.open_backup()
        assert calls.backup_streams_open == 1
        finish.set()
        await wait_until(lambda: calls.backup_streams_open == 0, 5.0, "the checkpoint to be removed")
        stream = await successor.open_backup()
        await stream.close()
    finally:
        finish.set()
        for side in (core, channel, successor_core, successor_channel):
            await side.close()
        await calls.close_backups()


async def test_a_backup_request_cancelled_while_the_core_opens_it_does_not_keep_its_stream(
        single: RunningNode, monkeypatch: pytest.MonkeyPatch) -> None:
    """The client hangs up while the core takes the checkpoint: the worker tells the core it gave the call
    up, and the core closes the stream once it is open rather than keep one nobody will read or close."""
    calls = core_calls(single)
    started, release, opened = asyncio.Event(), asyncio.Event(), asyncio.Event()
    open_backup = single.service.open_backup

    async def open_backup_held_until_released() -> Any:
        started.set()
        await release.wait()  # the checkpoint is being taken
        try:
            return await open_backup()
        finally:
            opened.set()

    monkeypatch.setattr(single.service, "open_backup", open_backup_held_until_released)
    core, channel = await pair(calls.handlers)
    service = RemoteService(single.node_id, channel)
    opening = asyncio.create_task(service.open_backup())
    await asyncio.wait_for(started.wait(), 5)
    opening.cancel()  # the client hangs up
    await asyncio.gather(opening, return_exceptions=True)
    await asyncio.sleep(0.05)  # the worker's CANCEL reaches the core
    release.set()
    try:
        await asyncio.wait_for(opened.wait(), 5)  # the core's open finished after its caller was gone
        await wait_until(lambda: calls.backup_streams_open == 0, 5.0, "the abandoned stream to be closed")
        stream = await service.open_backup()
        await stream.close()
    finally:
        await core.close()
        await channel.close()
        await calls.close_backups()


async def test_two_backups_opened_at_once_through_two_workers_are_not_both_let_through(
        single: RunningNode) -> None:
    """docs/api.md: at most [http] max_backup_streams (default 1) backup streams per node at a time. The
    place is held from before the checkpoint is taken, so two opens arriving together do not both pass."""
    calls = core_calls(single)
    core1, channel1 = await pair(calls.handlers)
    core2, channel2 = await pair(calls.handlers)
    first, second = RemoteService(single.node_id, channel1), RemoteService(single.node_id, channel2)
    results = await asyncio.gather(first.open_backup(), second.open_backup(), return_exceptions=True)
    opened = [result for result in results if not isinstance(result, BaseException)]
    refused = [result for result in results if isinstance(result, BaseException)]
    for stream in opened:
        await stream.close()
    for channel in (core1, channel1, core2, channel2):
        await channel.close()
    await calls.close_backups()
    assert len(opened) == 1 and len(refused) == 1 and isinstance(refused[0], BackupBusy), results


async def test_a_worker_cannot_read_or_close_another_worker_s_backup_stream(single: RunningNode) -> None:
    calls = core_calls(single)
    core1, channel1 = await pair(calls.handlers)
    core2, channel2 = await pair(calls.handlers)
    try:
        opened = await channel1.call("backup.open", {})
        with pytest.raises(NotFound):
            await channel2.call("backup.read", {"id": opened["id"], "offset": 0, "length": 1})
        await channel2.call("backup.close", {"id": opened["id"]})  # not its own: nothing happens
        assert calls.backup_streams_open == 1
        assert len(await channel1.call("backup.read", {"id": opened["id"], "offset": 0, "length": 1})) == 1
        await channel1.call("backup.close", {"id": opened["id"]})
        assert calls.backup_streams_open == 0
    finally:
        for channel in (core1, channel1, core2, channel2):
            await channel.close()
        await calls.close_backups()


async def a_revoked_and_a_kept_admin_key(single: RunningNode) -> tuple[str, str]:
    """The ids of two runtime admin keys made on ``single``, the first revoked since."""
    admin = commands.Actor(name="admin", request_id="r")
    revoked_id = json.loads((await single.service.create_key("leaked", ["admin"], admin)).body)["id"]
    kept_id = json.loads((await single.service.create_key("kept", ["admin"], admin)).body)["id"]
    assert (await single.service.revoke_key(revoked_id, admin)).status == 200
    return revoked_id, kept_id


async def test_a_worker_s_membership_change_carries_its_runtime_key_to_the_core_which_refuses_a_revoked_one(
        single: RunningNode) -> None:
    """docs/security.md, "Revocation": the core checks the key a worker authenticated, after a read barrier;
    a revoked key's change is 401 and changes nothing, a key still held gets the change's own answer."""
    revoked_id, kept_id = await a_revoked_and_a_kept_admin_key(single)
    core, channel = await pair(core_calls(single).handlers)
    try:
        worker = RemoteService(single.node_id, channel)
        with pytest.raises(ServiceError) as raised:
            await worker.change_member("add", "n9", "127.0.0.1:9", revoked_id)
        assert raised.value.status == 401
        assert [member.node_id for member in single.node.replica.membership.members] == [single.node_id]
        with pytest.raises(MembershipChangeRefused):
            await worker.change_member("remove", "n9", None, kept_id)  # not a member: the change's own 409
    finally:
        await core.close()
        await channel.close()


@pytest.mark.parametrize(("workers", "requests", "share"), [
    (2, 256, 2048), (4, 8192, 2048), (15, 256, 273), (1, 100_000, 4096), (3, 0, 1365)])
def test_a_worker_s_share_of_read_points_covers_the_requests_it_may_work_on(
        workers: int, requests: int, share: int) -> None:
    """A worker's share of the core's read points is at least its share of [http] max_inflight_requests (one
    read point a request), within the node's 4,096: a worker of 4 with max_inflight_requests 8,192 may work
    on 2,048 requests at once, and was given 1,024 read points (4,096 / 4), so a working worker was refused."""
    service = SimpleNamespace(node=SimpleNamespace(config=SimpleNamespace(limits=LimitsConfig())))
    calls = CoreCalls(cast(Any, service), Metrics("core"), lambda: [], max_backup_streams=1, worker_count=workers,
                      requests_in_flight=requests)
    assert calls._read_points_share == share


async def test_one_worker_cannot_take_the_read_points_of_the_others() -> None:
    """docs/architecture.md: at most MAX_READ_POINTS_IN_FLIGHT read points run at once in a core, and each
    worker's channel at most its share of them (that bound over the node's workers), so a worker that
    holds all it may still leaves every other worker its share. Before, one worker could hold all 4,096 and
    every other worker's reads were refused as an overload until it let go."""
    gate = asyncio.Event()
    running: list[int] = []

    async def tokenize_read_point(epoch: int) -> int:
        running.append(epoch)
        await gate.wait()
        return 7

    service = SimpleNamespace(node=SimpleNamespace(config=SimpleNamespace(limits=LimitsConfig())),
                              tokenize_read_point=tokenize_read_point)
    calls = CoreCalls(cast(Any, service), Metrics("core"), lambda: [], max_backup_streams=1, worker_count=2)
    share = MAX_READ_POINTS_IN_FLIGHT // 2
    points = [{"kind": "tokenize", "epoch": 1, "items": 1}] * share
    greedy_core, greedy = await pair(calls.handlers)
    other_core, other = await pair(calls.handlers)
    try:
        first = asyncio.create_task(greedy.call("read_points", {"points": points}))
        await wait_until(lambda: len(running) == share, 5.0, "the greedy worker's points to run")
        with pytest.raises(Overloaded):  # past its share, though half the core's points are free
            await asyncio.wait_for(greedy.call("read_points", {"points": points[:1]}), 5.0)
        second = asyncio.create_task(other.call("read_points", {"points": points}))
        await wait_until(lambda: len(running) == 2 * share, 5.0, "the other worker's points to run")
        gate.set()
        assert await first == await second == [[7]] * share
        assert await greedy.call("read_points", {"points": points[:1]}) == [[7]]  # its share is free again
    finally:
        gate.set()
        for channel in (greedy, other, greedy_core, other_core):
            await channel.close()


async def test_a_worker_s_admin_reads_carry_its_runtime_key_to_the_core_which_refuses_a_revoked_one(
        single: RunningNode) -> None:
    """docs/security.md, "Revocation": the key, epoch and member listings and an epoch's token pages name the
    key a worker authenticated, which the core checks after a read barrier; a key still held is answered."""
    revoked_id, kept_id = await a_revoked_and_a_kept_admin_key(single)
    core, channel = await pair(core_calls(single).handlers)
    try:
        worker = RemoteService(single.node_id, channel)
        reads = {"keys": worker.list_keys, "epochs": worker.list_epochs, "members": worker.list_members,
                 "epoch tokens": lambda key_id: worker.epoch_tokens(1, None, 10, key_id)}
        for name, read in reads.items():
            with pytest.raises(ServiceError) as raised:
                await read(revoked_id)
            assert raised.value.status == 401, name
            assert await read(kept_id), name
            assert await read(None), name
    finally:
        await core.close()
        await channel.close()
