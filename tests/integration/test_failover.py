"""Three real nodes under failures (issue 4, points 6-8).

Every test records every client operation in a History and ends with the
history checks on every live node: each acknowledged token detokenizes to its
value there, no token has two values, no (value, epoch) has two tokens, no
response mixes epochs, a client never sees its epoch go backwards, and a
tokenize that started after a rotation was acknowledged is in that epoch or a
later one. Log events are asserted in the log of the node where they happen.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Sequence

import pytest

from harness import (ClusterHarness, RecordingClient, background_load, default_settings, wait_for,
                     wait_for_acknowledged)
from history import History, Kind, Status, assert_no_violations, check_history_async
from tokenvault.client.vault import ProblemError

pytestmark = pytest.mark.integration

FAILOVER_BOUND_SECONDS = 5.0
LOAD_WORKERS = 6


def value_pool(label: str, count: int) -> list[str]:
    marker = uuid.uuid4().hex[:12]
    return [f"{label}-{marker}-{index:04d}" for index in range(count)]


async def assert_history_holds(harness: ClusterHarness, history: History, node_ids: Sequence[str]) -> None:
    async with harness.node_clients(node_ids, deadline_seconds=10.0) as clients:
        violations = await check_history_async(history, {node: client.detokenize for node, client in clients.items()})
    assert_no_violations(violations, history)
    print(f"history checked on {list(node_ids)}: {history.summary()}")
    for operation in history.operations():
        if not operation.acknowledged:
            print("  not acknowledged:", operation.describe())


async def time_to_first_write(harness: ClusterHarness, history: History, node_ids: Sequence[str],
                              since_monotonic: float, timeout_seconds: float = 15.0) -> float:
    """Send fresh single-value tokenizes through `node_ids` until one is acknowledged; seconds since
    `since_monotonic`. Each attempt has a 1 s deadline, so the figure overstates by at most that."""
    recorder = RecordingClient(history, f"probe-{uuid.uuid4().hex[:6]}",
                               harness.client(node_ids, timeout_seconds=1.0, deadline_seconds=1.0), "+".join(node_ids))
    try:
        for attempt in range(10_000):
            if await recorder.tokenize([f"probe-{uuid.uuid4().hex}-{attempt}"]) is not None:
                return time.monotonic() - since_monotonic
            if time.monotonic() - since_monotonic > timeout_seconds:
                raise AssertionError(f"no write acknowledged within {timeout_seconds} s ({history.summary()})")
    finally:
        await recorder.close()
    raise AssertionError("unreachable")


def tokenizes_started_after(history: History, since_monotonic: float, client_prefix: str = "") -> list:
    return [operation for operation in history.operations()
            if operation.kind is Kind.TOKENIZE and operation.start_monotonic >= since_monotonic
            and operation.client_id.startswith(client_prefix)]


def highest_commit_index(harness: ClusterHarness, node_ids: Sequence[str]) -> int:
    answers = harness.healths(node_ids)
    return max(answer["commit_index"] for answer in answers.values() if answer is not None)


async def primary_now(harness: ClusterHarness) -> tuple[str, int, list[str]]:
    """The primary all nodes agree on right now, its view, and the other nodes.

    Why right before each fault: on a loaded machine an election can happen while load runs,
    and a fault aimed at a former primary would test something else."""
    primary = await asyncio.to_thread(harness.wait_for_primary)
    health = await harness.health_async(primary)
    assert health is not None and health["role"] == "primary", health
    return primary, health["view"], [node_id for node_id in harness.node_ids if node_id != primary]


async def converged(harness: ClusterHarness) -> str:
    """Wait until every node agrees on one primary and has applied the highest commit index."""
    primary = await asyncio.to_thread(harness.wait_for_primary, None, 15.0)
    commit_index = await asyncio.to_thread(highest_commit_index, harness, harness.node_ids)
    await asyncio.to_thread(harness.wait_for_applied, harness.node_ids, commit_index, 15.0)
    return primary


# ---------------------------------------------------------------- crashes


async def test_primary_killed_under_load_new_primary_serves_within_5_s(
        make_cluster: Callable[..., ClusterHarness]) -> None:
    # The contract's bound holds "with the default timeouts": this cluster runs the shipped defaults.
    harness = make_cluster(settings=default_settings())
    history = History()
    pool = value_pool("kill-primary", 60)  # the load draws from it at every request
    async with background_load(harness, history, pool, workers=LOAD_WORKERS):
        await wait_for_acknowledged(history, 20)
        old_primary, old_view, survivors = await primary_now(harness)
        marks = {node_id: harness.log_mark(node_id) for node_id in survivors}
        # Other values from the kill on: a value tokenized again would write a mapping the kill lost
        # anew (tokens are deterministic) and hide the loss from the read-back below.
        pool[:] = value_pool("kill-primary-after", 60)
        killed_at = time.monotonic()
        await asyncio.to_thread(harness.kill, old_primary)
        # "through any surviving node": each survivor on its own takes a write within the bound
        each = await asyncio.gather(*(time_to_first_write(harness, history, [node_id], killed_at)
                                      for node_id in survivors))
        recovery_seconds = max(each)
        await wait_for_acknowledged(history, 20, since_monotonic=killed_at + recovery_seconds)
    assert recovery_seconds <= FAILOVER_BOUND_SECONDS, (
        f"first write through each survivor acknowledged {dict(zip(survivors, each))} s after the kill")

    new_primary = await asyncio.to_thread(harness.wait_for_primary, survivors)
    elected = harness.find_events(new_primary, "primary.elected", since=marks[new_primary])
    assert elected and elected[-1]["view"] > old_view, elected
    for node_id in survivors:
        harness.wait_for_event(node_id, "peer.down", since=marks[node_id], peer=old_primary)
    await assert_history_holds(harness, history, survivors)
    print(f"first write through each survivor after killing the primary: "
          f"{', '.join(f'{node} {seconds:.2f} s' for node, seconds in zip(survivors, each))}; {history.summary()}")


async def test_killed_backup_does_not_interrupt_service(make_cluster: Callable[..., ClusterHarness]) -> None:
    harness = make_cluster()
    history = History()
    async with background_load(harness, history, value_pool("kill-backup", 60), workers=LOAD_WORKERS):
        await wait_for_acknowledged(history, 15)
        primary, view, backups = await primary_now(harness)
        backup = backups[0]
        survivors = [node_id for node_id in harness.node_ids if node_id != backup]
        mark = harness.log_mark(primary)
        killed_at = time.monotonic()
        await asyncio.to_thread(harness.kill, backup)
        await wait_for_acknowledged(history, 30, since_monotonic=killed_at)

    after_kill = tokenizes_started_after(history, killed_at)
    failed = [operation.describe() for operation in after_kill if not operation.acknowledged]
    assert failed == [], f"tokenizes failed after a backup was killed: {failed[:5]}"
    health = harness.health(primary)
    assert health is not None and health["role"] == "primary" and health["view"] == view, health
    harness.wait_for_event(primary, "peer.down", since=mark, peer=backup)
    await assert_history_holds(harness, history, survivors)


async def test_two_of_three_down_no_write_is_acknowledged(make_cluster: Callable[..., ClusterHarness]) -> None:
    harness = make_cluster()
    history = History()
    primary = await asyncio.to_thread(harness.wait_for_primary)
    backups = [node_id for node_id in harness.node_ids if node_id != primary]
    writer = RecordingClient(history, "before", harness.client(), "all")
    known: list[str] = []
    for batch in range(3):
        result = await writer.tokenize(value_pool(f"before-{batch}", 20))
        assert result is not None
        known.extend(result.tokens)
    await writer.close()

    for backup in backups:
        await asyncio.to_thread(harness.kill, backup)
    killed_at = time.monotonic()
    # The lone former primary cannot reach a majority: every write must be refused (503) or time out.
    lone = [RecordingClient(history, f"lone-{index}", harness.client(primary, deadline_seconds=2.5), primary)
            for index in range(4)]
    try:
        await asyncio.gather(*(recorder.tokenize(value_pool(f"lone-{index}", 3))
                               for index, recorder in enumerate(lone)))
    finally:
        for recorder in lone:
            await recorder.close()
    during = tokenizes_started_after(history, killed_at)
    assert [operation.describe() for operation in during if operation.acknowledged] == []
    assert any(operation.status is Status.ERROR and operation.error_status == 503 for operation in during), \
        [operation.describe() for operation in during]
    assert all(operation.error_status in (503, None) for operation in during)
    # Writes and detokenize alike: 503 with Retry-After (docs/failure-modes.md), at the HTTP level.
    async with harness.client(primary, deadline_seconds=1.0) as lone_client:
        for attempt in (lone_client.tokenize(value_pool("lone-direct", 1)), lone_client.detokenize(known[:1])):
            with pytest.raises(ProblemError) as refused:
                await attempt
            assert refused.value.status == 503 and refused.value.retry_after_seconds is not None, refused.value
    wait_for(lambda: (harness.health(primary) or {}).get("role") != "primary", 5.0,
             "the primary without a quorum to step down")

    restarted_at = time.monotonic()
    await asyncio.to_thread(harness.restart, backups[0])
    live = [primary, backups[0]]
    recovery_seconds = await time_to_first_write(harness, history, live, restarted_at)
    assert recovery_seconds <= FAILOVER_BOUND_SECONDS + 3.0, recovery_seconds  # includes the process start
    await assert_history_holds(harness, history, live)


async def test_restarted_backup_recovers_catches_up_and_serves_what_it_missed(
        make_cluster: Callable[..., ClusterHarness]) -> None:
    harness = make_cluster()
    history = History()
    primary = await asyncio.to_thread(harness.wait_for_primary)
    backup = next(node_id for node_id in harness.node_ids if node_id != primary)
    writer = RecordingClient(history, "early", harness.client(), "all")
    assert await writer.tokenize(value_pool("early", 20)) is not None
    await asyncio.to_thread(harness.kill, backup)

    live = [node_id for node_id in harness.node_ids if node_id != backup]
    missed = RecordingClient(history, "missed", harness.client(live), "+".join(live))
    for batch in range(8):
        assert await missed.tokenize(value_pool(f"missed-{batch}", 25)) is not None
    await missed.close()
    await writer.close()
    commit_index = highest_commit_index(harness, live)

    backup_mark, primary_mark = harness.log_mark(backup), harness.log_mark(primary)
    await asyncio.to_thread(harness.restart, backup)
    replayed = harness.wait_for_event(backup, "node.replayed", since=backup_mark)
    assert replayed["wal_entries"] + replayed["store_applied_index"] > 0, replayed
    assert replayed["store_applied_index"] < commit_index, replayed  # it missed the 8 batches
    # node.recovered: how far it replayed and how far it caught up (CONTRACT.md section 4).
    recovered = harness.wait_for_event(backup, "node.recovered", since=backup_mark)
    replay_fields = ("wal_entries", "log_base_index", "store_applied_index", "commit_index", "truncated_tail_bytes",
                     "view")
    assert [recovered[key] for key in replay_fields] == [replayed[key] for key in replay_fields], recovered
    assert recovered["caught_up_index"] >= commit_index and recovered["primary"] == primary, recovered
    harness.wait_for_event(primary, "peer.up", since=primary_mark, peer=backup)
    harness.wait_for_event(backup, "peer.up", since=backup_mark, peer=primary)
    await asyncio.to_thread(harness.wait_for_applied, [backup], commit_index, 10.0)

    # The tokens issued while it was down are now applied on the backup itself: read them there.
    missed_tokens = {token: value for operation in history.acknowledged(Kind.TOKENIZE)
                     if operation.client_id == "missed"
                     for value, token in zip(operation.inputs, operation.outputs)}
    async with harness.node_clients([backup]) as clients:
        answers = await clients[backup].detokenize(list(missed_tokens))
    assert list(answers) == list(missed_tokens.values())
    health = harness.health(backup)
    assert health is not None and health["primary_id"] == primary and health["role"] == "backup", health
    await assert_history_holds(harness, history, harness.node_ids)


async def test_torn_wal_tail_on_one_node_of_three_is_cut_and_it_catches_up(
        make_cluster: Callable[..., ClusterHarness]) -> None:
    harness = make_cluster()
    history = History()
    writer = RecordingClient(history, "writer", harness.client(), "all")
    assert await writer.tokenize(value_pool("torn-early", 30)) is not None
    primary, _, backups = await primary_now(harness)
    torn_node = backups[0]
    await asyncio.to_thread(harness.kill, torn_node)
    torn_record = harness.tear_wal_tail(torn_node)
    for batch in range(3):
        assert await writer.tokenize(value_pool(f"torn-late-{batch}", 20)) is not None
    await writer.close()
    commit_index = highest_commit_index(harness, [primary])

    mark = harness.log_mark(torn_node)
    await asyncio.to_thread(harness.restart, torn_node)
    recovered = harness.wait_for_event(torn_node, "node.recovered", since=mark)
    assert recovered["truncated_tail_bytes"] == len(torn_record), recovered
    await asyncio.to_thread(harness.wait_for_applied, [torn_node], commit_index, 10.0)
    await assert_history_holds(harness, history, harness.node_ids)


async def test_whole_cluster_killed_under_load_and_restarted_loses_nothing(
        make_cluster: Callable[..., ClusterHarness]) -> None:
    harness = make_cluster()
    history = History()
    values = value_pool("whole", 40)
    pool = list(values)  # the load draws from it at every request
    async with background_load(harness, history, pool, workers=LOAD_WORKERS, deadline_seconds=10.0):
        await wait_for_acknowledged(history, 25)
        # From here the load tokenizes other values: one of the first ones tokenized again after the
        # restart would write a lost mapping anew (tokens are deterministic) and hide the loss.
        pool[:] = value_pool("whole-after", 40)
        marks = {node_id: harness.log_mark(node_id) for node_id in harness.node_ids}
        await asyncio.to_thread(harness.kill_all)
        killed_at = time.monotonic()
        await asyncio.to_thread(harness.start_all)
        await wait_for_acknowledged(history, 10, since_monotonic=killed_at)

    for node_id in harness.node_ids:
        recovered = harness.wait_for_event(node_id, "node.recovered", since=marks[node_id])
        assert recovered["wal_entries"] + recovered["store_applied_index"] > 0, (node_id, recovered)
    # Every token acknowledged before the kill reads back on every node before the first values are
    # tokenized again.
    await converged(harness)
    await assert_history_holds(harness, history, harness.node_ids)
    # Tokenizing the same values again (same epoch) must give the same tokens: the checker's
    # value_epoch_single_token finds any difference.
    again = RecordingClient(history, "again", harness.client(), "all")
    assert await again.tokenize(values) is not None
    await again.close()
    await converged(harness)
    await assert_history_holds(harness, history, harness.node_ids)


# ---------------------------------------------------------------- a paused primary


async def send_raw_tokenize(harness: ClusterHarness, history: History, client_id: str, node_id: str,
                            values: list[str]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int]:
    """Write a whole tokenize request into the node's socket; returns once the kernel holds it.

    Why raw: a node stopped with SIGSTOP still completes TCP handshakes (the kernel does), so the
    request is certainly waiting in its socket when it is resumed."""
    node = harness.node(node_id)
    body = json.dumps({"values": values}).encode()
    head = (f"POST /v1/tokenize HTTP/1.1\r\nHost: 127.0.0.1:{node.http_port}\r\n"
            f"Authorization: Bearer {harness.key()}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    operation_id = history.begin(client_id, Kind.TOKENIZE, node_id, values)
    reader, writer = await asyncio.open_connection("127.0.0.1", node.http_port)
    writer.write(head + body)
    await writer.drain()
    return reader, writer, operation_id


async def finish_raw_tokenize(history: History, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                              operation_id: int, timeout_seconds: float) -> None:
    try:
        response = await asyncio.wait_for(reader.read(), timeout_seconds)
    except (asyncio.TimeoutError, OSError) as error:
        history.timeout(operation_id, type(error).__name__)
        return
    finally:
        writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split()
    if len(status_line) < 2 or not status_line[1].isdigit():
        history.timeout(operation_id, "no complete HTTP answer")
        return
    status = int(status_line[1])
    if status != 200:
        history.error(operation_id, status, "raw request")
        return
    document = json.loads(body)
    history.ok(operation_id, epoch=document["epoch"], outputs=document["tokens"])


async def test_paused_primary_never_acknowledges_as_a_stale_primary(
        make_cluster: Callable[..., ClusterHarness]) -> None:
    harness = make_cluster()
    history = History()
    async with background_load(harness, history, value_pool("paused", 40), workers=4):
        await wait_for_acknowledged(history, 10)
        old_primary, old_view, others = await primary_now(harness)
        await asyncio.to_thread(harness.pause, old_primary)
        new_primary = await asyncio.to_thread(harness.wait_for_primary, others, FAILOVER_BOUND_SECONDS)
        admin = RecordingClient(history, "admin", harness.client(others), "+".join(others))
        rotation = await admin.rotate()
        await admin.close()
        assert rotation is not None, history.summary()
        # Requests that start after the rotation's acknowledgement, queued at the paused old primary.
        queued = [await send_raw_tokenize(harness, history, f"stale-{index}", old_primary,
                                          value_pool(f"stale-{index}", 3)) for index in range(4)]
        resumed_at = time.monotonic()
        await asyncio.to_thread(harness.resume, old_primary)
        await asyncio.gather(*(finish_raw_tokenize(history, *request, timeout_seconds=8.0) for request in queued))
        await asyncio.to_thread(
            wait_for, lambda: (answer := harness.health(old_primary)) is not None
            and answer["role"] == "backup" and answer["view"] > old_view, 10.0, "the old primary to step down")
        await wait_for_acknowledged(history, 5, since_monotonic=resumed_at)

    stale = [operation for operation in history.operations() if operation.client_id.startswith("stale-")]
    print("requests queued at the paused primary:", *[operation.describe() for operation in stale], sep="\n  ")
    too_old = [operation.describe() for operation in stale
               if operation.acknowledged and (operation.epoch or 0) < rotation.epoch]
    assert too_old == [], f"the resumed old primary acknowledged in a retired epoch: {too_old}"
    assert harness.agreed_primary() is not None
    assert new_primary in others
    await converged(harness)
    await assert_history_holds(harness, history, harness.node_ids)


# ---------------------------------------------------------------- partitions through the proxies


@pytest.mark.parametrize("silently", [False, True], ids=["connections-reset", "packets-dropped"])
async def test_partitioned_primary_cannot_write_majority_elects_and_all_converge(
        make_cluster: Callable[..., ClusterHarness], silently: bool) -> None:
    harness = make_cluster(proxies=True)
    history = History()
    await asyncio.to_thread(harness.wait_for_primary)
    assert all(proxy.statistics().forwarded_bytes["a->b"] > 0 for proxy in harness.proxies.values()), \
        "the peer links do not go through the proxies"
    async with background_load(harness, history, value_pool("partition", 40), workers=4):
        await wait_for_acknowledged(history, 10)
        old_primary, old_view, others = await primary_now(harness)
        marks = {node_id: harness.log_mark(node_id) for node_id in harness.node_ids}
        cut_at = time.monotonic()
        harness.isolate(old_primary, silently=silently)
        minority = [RecordingClient(history, f"minority-{index}",
                                    harness.client(old_primary, timeout_seconds=3.0, deadline_seconds=3.0),
                                    old_primary) for index in range(3)]
        minority_writes = asyncio.gather(*(recorder.tokenize(value_pool(f"minority-{index}", 3))
                                           for index, recorder in enumerate(minority)))
        new_primary = await asyncio.to_thread(harness.wait_for_primary, others, FAILOVER_BOUND_SECONDS)
        recovery_seconds = await time_to_first_write(harness, history, others, cut_at)
        await minority_writes
        for recorder in minority:
            await recorder.close()
        await wait_for_acknowledged(history, 10, since_monotonic=cut_at + recovery_seconds)
        healed_at_mark = harness.log_mark(old_primary)
        harness.heal_all()
        await converged(harness)

    assert recovery_seconds <= FAILOVER_BOUND_SECONDS, recovery_seconds
    minority_ops = [operation for operation in history.operations() if operation.client_id.startswith("minority-")]
    assert [operation.describe() for operation in minority_ops if operation.acknowledged] == []
    assert all(operation.error_status in (503, None) for operation in minority_ops), \
        [operation.describe() for operation in minority_ops]
    elected = harness.find_events(new_primary, "primary.elected", since=marks[new_primary])
    assert elected and elected[-1]["view"] > old_view, elected
    await assert_history_holds(harness, history, harness.node_ids)
    # A peer cut off must show up as peer.down in the logs of the nodes that lost it, also when the
    # network drops packets without closing anything (then only silence tells).
    for node_id in others:
        harness.wait_for_event(node_id, "peer.down", since=marks[node_id], timeout_seconds=1.0, peer=old_primary)
    if not silently:
        harness.wait_for_event(old_primary, "peer.up", since=healed_at_mark)


async def test_peer_links_come_back_after_resets_during_handshakes(
        make_cluster: Callable[..., ClusterHarness]) -> None:
    harness = make_cluster(proxies=True)
    await asyncio.to_thread(harness.wait_for_primary)
    # Every link resets its connections and every reconnection attempt, mid-handshake, for a while.
    for proxy in harness.proxies.values():
        proxy.refuse_new_connections()
        proxy.close_connections()
    await asyncio.to_thread(
        wait_for, lambda: all(proxy.statistics().connections_refused >= 6 for proxy in harness.proxies.values()),
        15.0, "every link to fail six reconnection attempts")
    marks = {node_id: harness.log_mark(node_id) for node_id in harness.node_ids}
    harness.heal_all()
    # Then every dialer must get its link back: the smaller id logs peer.up for the larger one.
    for dialer, acceptor in harness.proxies:
        harness.wait_for_event(dialer, "peer.up", since=marks[dialer], peer=acceptor)
    await converged(harness)
    history = History()
    for node_id in harness.node_ids:
        recorder = RecordingClient(history, f"after-{node_id}", harness.client(node_id), node_id)
        assert await recorder.tokenize(value_pool(f"after-{node_id}", 5)) is not None, history.summary()
        await recorder.close()
    await assert_history_holds(harness, history, harness.node_ids)


async def test_delayed_links_then_primary_cut_one_way_then_healed(
        make_cluster: Callable[..., ClusterHarness]) -> None:
    harness = make_cluster(proxies=True)
    history = History()
    async with background_load(harness, history, value_pool("one-way", 40), workers=4):
        await wait_for_acknowledged(history, 5)
        for proxy in harness.proxies.values():
            proxy.delay(30)
        delayed_at = time.monotonic()
        await wait_for_acknowledged(history, 15, since_monotonic=delayed_at)
        harness.heal_all()

        # Everything the primary sends is lost; it still hears the others.
        old_primary, _, others = await primary_now(harness)
        cut_at = time.monotonic()
        for node_id in others:
            harness.cut_from(old_primary, node_id)
        new_primary = await asyncio.to_thread(harness.wait_for_primary, others, FAILOVER_BOUND_SECONDS)
        recovery_seconds = await time_to_first_write(harness, history, others, cut_at)
        await wait_for_acknowledged(history, 10, since_monotonic=cut_at + recovery_seconds)
        harness.heal_all()
        await converged(harness)
    assert recovery_seconds <= FAILOVER_BOUND_SECONDS, recovery_seconds
    assert new_primary != old_primary
    dropped = sum(harness.proxy(old_primary, node_id).statistics().dropped_bytes["a->b" if old_primary < node_id
                                                                                  else "b->a"]
                  for node_id in others)
    assert dropped > 0, "the one-way cut dropped nothing"
    await assert_history_holds(harness, history, harness.node_ids)


async def test_primary_that_hears_nothing_does_not_stop_the_majority(
        make_cluster: Callable[..., ClusterHarness]) -> None:
    harness = make_cluster(proxies=True)
    history = History()
    async with background_load(harness, history, value_pool("deaf", 40), workers=4):
        await wait_for_acknowledged(history, 5)
        # Everything sent to the primary is lost; what it sends (heartbeats, later vote requests) arrives.
        old_primary, _, others = await primary_now(harness)
        cut_at = time.monotonic()
        for node_id in others:
            harness.cut_from(node_id, old_primary)
        recovery_seconds = await time_to_first_write(harness, history, others, cut_at)
        await wait_for_acknowledged(history, 10, since_monotonic=cut_at + recovery_seconds)
        harness.heal_all()
        await converged(harness)
    assert recovery_seconds <= FAILOVER_BOUND_SECONDS, recovery_seconds
    dropped = sum(harness.proxy(old_primary, node_id).statistics().dropped_bytes["b->a" if old_primary < node_id
                                                                                  else "a->b"]
                  for node_id in others)
    assert dropped > 0, "the one-way cut dropped nothing"
    await assert_history_holds(harness, history, harness.node_ids)


# ---------------------------------------------------------------- concurrency and epochs


async def test_concurrent_clients_and_rotations_keep_epoch_safety(
        make_cluster: Callable[..., ClusterHarness]) -> None:
    harness = make_cluster()
    history = History()
    rotations = []
    async with background_load(harness, history, value_pool("epochs", 24), workers=8, batch_items=4):
        await wait_for_acknowledged(history, 10)
        for number in range(4):
            # Each rotation enters through another node, so backups forward rotations too.
            entry = harness.node_ids[number % len(harness.node_ids)]
            admin = RecordingClient(history, "admin", harness.client(entry), entry)
            rotation = await admin.rotate()
            await admin.close()
            assert rotation is not None, history.summary()
            rotations.append((time.monotonic(), rotation.epoch))
            await asyncio.to_thread(
                wait_for, lambda: all(answer is not None and answer["active_epoch"] >= rotation.epoch
                                      for answer in harness.healths().values()),
                FAILOVER_BOUND_SECONDS, f"every node's /health to show epoch {rotation.epoch}")
            await wait_for_acknowledged(history, 8, since_monotonic=rotations[-1][0])

    epochs = [epoch for _, epoch in rotations]
    assert epochs == sorted(set(epochs)), epochs
    seen = {operation.epoch for operation in history.acknowledged(Kind.TOKENIZE)}
    assert set(epochs) <= seen, (epochs, seen)
    await assert_history_holds(harness, history, harness.node_ids)
