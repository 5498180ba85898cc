"""A single real node (issue 2, point 9): kill -9 and restart keep every acknowledged
token, give the same tokens again, write no submitted value to any file, and a torn
write-ahead-log tail is cut off on restart."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from harness import HTTP_WORKERS, NO_RETRY_SECONDS, ClusterHarness, RecordingClient, wait_for
from history import History, assert_no_violations, check_history_async

pytestmark = pytest.mark.integration

BATCH_COUNT = 3
BATCH_ITEMS = 100
SINGLE_REQUESTS = 20


def marked_values(marker: str, count: int) -> list[str]:
    """Distinctive synthetic values: each holds the marker, some are non-ASCII."""
    return [f"{marker}-{index:05d}" + ("-\u00fc\u2713" if index % 7 == 0 else "") for index in range(count)]


async def tokenize_all(harness: ClusterHarness, history: History, values: list[str],
                       client_id: str) -> dict[str, str]:
    """Tokenize in a few concurrent batches plus concurrent single-value requests; value -> token."""
    batches = [values[start:start + BATCH_ITEMS] for start in range(0, BATCH_COUNT * BATCH_ITEMS, BATCH_ITEMS)]
    singles = values[BATCH_COUNT * BATCH_ITEMS:]
    # Each request sent once, so the sealed-values count below is exact.
    clients = (harness.client("n1", timeout_seconds=NO_RETRY_SECONDS, deadline_seconds=NO_RETRY_SECONDS)
               for _ in range(len(batches) + len(singles)))
    recorders = [RecordingClient(history, f"{client_id}-{index}", client, "n1")
                 for index, client in enumerate(clients)]
    try:
        requests = [recorder.tokenize(batch) for recorder, batch in zip(recorders, batches)]
        requests += [recorder.tokenize([value]) for recorder, value in zip(recorders[len(batches):], singles)]
        results = await asyncio.gather(*requests)
    finally:
        for recorder in recorders:
            await recorder.close()
    assert all(result is not None for result in results), history.summary()
    tokens: dict[str, str] = {}
    for chunk, result in zip(batches + [[value] for value in singles], results):
        assert result is not None
        tokens.update(zip(chunk, result.tokens))
    return tokens


async def assert_history_holds(harness: ClusterHarness, history: History) -> None:
    async with harness.node_clients() as clients:
        violations = await check_history_async(history, {node: client.detokenize for node, client in clients.items()})
    assert_no_violations(violations, history)


def files_containing(directory: Path, needles: list[bytes]) -> list[str]:
    """Every file under `directory` whose bytes contain one of the needles."""
    found = []
    for path in sorted(directory.rglob("*")):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            if any(needle in data for needle in needles):
                found.append(str(path.relative_to(directory)))
    return found


def marker_needles(marker: str) -> list[bytes]:
    # The marker in the encodings a careless store or log could use.
    return [marker.encode("utf-8"), marker.encode("utf-16-le"), marker.encode("utf-16-be")]


async def test_kill_restart_keeps_tokens_and_no_value_reaches_disk(
        make_cluster: Callable[..., ClusterHarness]) -> None:
    harness = make_cluster(nodes=1)
    marker = f"TVMARK{uuid.uuid4().hex}"
    values = marked_values(marker, BATCH_COUNT * BATCH_ITEMS + SINGLE_REQUESTS)
    history = History()
    first_tokens = await tokenize_all(harness, history, values, "before")
    assert len(set(first_tokens.values())) == len(values)
    # Every value was sealed by the node's HTTP workers (none of these requests has an Idempotency-Key),
    # or, in a one-process node, the 100-value batches by its sealer helper; the helper goes with its node.
    sealer_pid = harness.wait_for_event("n1", "sealer.started")["pid"]
    if HTTP_WORKERS:
        sealed = f'tokenvault_sealed_values_total{{where="worker"}} {float(len(values))}'
    else:
        sealed = f'tokenvault_sealed_values_total{{where="helper"}} {float(BATCH_COUNT * BATCH_ITEMS)}'
    harness.metrics_when("n1", lambda text: sealed in text)

    harness.kill("n1")
    wait_for(lambda: not Path(f"/proc/{sealer_pid}").exists(), 10.0, "the killed node's sealer process to exit")
    mark = harness.log_mark("n1")
    harness.restart("n1")
    harness.wait_for_primary()
    recovered = harness.wait_for_event("n1", "node.recovered", since=mark)
    assert recovered["store_applied_index"] + recovered["wal_entries"] > 0, recovered
    # Every token acknowledged before the kill reads back before anything is tokenized again: a tokenize
    # of the same value would write a lost mapping anew (tokens are deterministic) and hide the loss.
    await assert_history_holds(harness, history)

    second_tokens = await tokenize_all(harness, history, values, "after")
    assert second_tokens == first_tokens, "the same values gave different tokens after kill -9 and restart"
    await assert_history_holds(harness, history)

    health = harness.health("n1")
    assert health is not None and health["applied_index"] >= 2, health
    leaked = files_containing(harness.directory, marker_needles(marker))
    assert leaked == [], f"a submitted value appears in plaintext in {leaked}"
    # The scan itself must be able to see a value in a file: plant one and look again.
    planted = harness.directory / "n1" / "planted.txt"
    planted.write_bytes(values[1].encode("utf-8"))
    assert files_containing(harness.directory, marker_needles(marker)) == ["n1/planted.txt"]
    planted.unlink()


async def test_torn_wal_tail_is_cut_and_everything_acknowledged_survives(
        make_cluster: Callable[..., ClusterHarness]) -> None:
    harness = make_cluster(nodes=1)
    values = marked_values(f"TVTORN{uuid.uuid4().hex}", BATCH_COUNT * BATCH_ITEMS + SINGLE_REQUESTS)
    history = History()
    first_tokens = await tokenize_all(harness, history, values, "before")
    harness.kill("n1")

    segment = harness.last_wal_segment("n1")
    size_before = segment.stat().st_size
    torn_record = harness.tear_wal_tail("n1")

    mark = harness.log_mark("n1")
    harness.restart("n1")
    harness.wait_for_primary()
    recovered = harness.wait_for_event("n1", "node.recovered", since=mark)
    assert recovered["truncated_tail_bytes"] == len(torn_record), recovered
    assert segment.stat().st_size >= size_before
    with open(segment, "rb") as handle:
        handle.seek(size_before)
        assert not handle.read().startswith(torn_record), "the torn record is still in the segment"

    await assert_history_holds(harness, history)
    second_tokens = await tokenize_all(harness, history, values, "after")
    assert second_tokens == first_tokens
    await assert_history_holds(harness, history)
