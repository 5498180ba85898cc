"""tokenvault.core.loopwatch: a blocked loop shows up in the stall histogram, the gauge and the log."""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from tokenvault.core.loopwatch import LoopWatch
from tokenvault.metrics import Metrics


def stall_samples(metrics: Metrics) -> dict[str, float]:
    """The stall histogram's buckets (by ``le``), count and sum, and the max gauge, by short name."""
    body, _ = metrics.render()
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == "tokenvault_event_loop_stall_seconds_bucket":
                found[sample.labels["le"]] = sample.value
            elif sample.name.startswith("tokenvault_event_loop_stall"):
                found[sample.name.removeprefix("tokenvault_event_loop_stall_")] = sample.value
    return found


async def test_a_blocked_loop_is_observed_in_its_bucket_and_logged() -> None:
    metrics = Metrics()
    watch = LoopWatch(metrics, interval_seconds=0.01, warn_after_seconds=0.1).start()
    try:
        await asyncio.sleep(0.05)
        with capture_logs() as logs:
            asyncio.get_running_loop().call_soon(time.sleep, 0.2)  # holds the loop as a slow callback would
            await asyncio.sleep(0.1)
    finally:
        await watch.stop()
    found = stall_samples(metrics)
    # Exactly one wake-up was late by more than 100 ms, and by less than 250 ms.
    assert found["seconds_count"] - found["0.1"] == 1
    assert found["0.25"] == found["seconds_count"]
    assert 0.15 <= found["max_seconds"] <= 0.25
    stalled = [entry for entry in logs if entry["event"] == "loop.stalled"]
    assert len(stalled) == 1
    assert stalled[0]["log_level"] == "warning"
    assert 150 <= stalled[0]["stall_ms"] <= 250
    assert stalled[0]["threshold_ms"] == 100


async def test_an_idle_loop_records_small_stalls_and_logs_nothing() -> None:
    metrics = Metrics()
    with capture_logs() as logs:
        watch = LoopWatch(metrics, interval_seconds=0.01).start()
        try:
            await asyncio.sleep(0.3)
        finally:
            await watch.stop()
    found = stall_samples(metrics)
    assert found["seconds_count"] >= 10
    # Loose on purpose (a busy CI machine delays timers a little), yet far below a heartbeat.
    assert found["0.1"] == found["seconds_count"]
    assert found["max_seconds"] < 0.1
    assert not [entry for entry in logs if entry["event"] == "loop.stalled"]


async def test_stop_ends_the_task_and_nothing_is_observed_after() -> None:
    metrics = Metrics()
    watch = LoopWatch(metrics, interval_seconds=0.005).start()
    task = watch._task
    await asyncio.sleep(0.05)
    await watch.stop()
    assert task is not None and task.done()
    count = stall_samples(metrics)["seconds_count"]
    await asyncio.sleep(0.05)
    assert stall_samples(metrics)["seconds_count"] == count
    await watch.stop()  # twice is harmless
    assert not [other for other in asyncio.all_tasks() if other.get_name() == "loopwatch"]


async def test_start_twice_is_refused() -> None:
    watch = LoopWatch(Metrics()).start()
    try:
        with pytest.raises(RuntimeError):
            watch.start()
    finally:
        await watch.stop()


def test_the_max_gauge_forgets_stalls_older_than_its_window() -> None:
    now = [1000.0]
    metrics = Metrics()
    watch = LoopWatch(metrics, max_window_seconds=60, clock=lambda: now[0])
    with capture_logs():
        watch.record(0.5)
    assert stall_samples(metrics)["max_seconds"] == 0.5
    now[0] += 30
    watch.record(0.02)
    assert stall_samples(metrics)["max_seconds"] == 0.5
    now[0] += 31  # the 0.5 s stall is now 61 s old
    watch.record(0.003)
    assert stall_samples(metrics)["max_seconds"] == 0.02
    now[0] += 120
    watch.record(0.001)
    assert stall_samples(metrics)["max_seconds"] == 0.001


def test_the_warning_threshold_is_configurable_and_logs_only_lengths() -> None:
    watch = LoopWatch(Metrics(), warn_after_seconds=0.03)
    with capture_logs() as logs:
        watch.record(0.02)
        watch.record(0.04)
    assert [(entry["event"], entry["stall_ms"], entry["threshold_ms"]) for entry in logs] == [
        ("loop.stalled", 40.0, 30.0)]
    assert set(logs[0]) <= {"event", "log_level", "logger", "stall_ms", "threshold_ms"}


@pytest.mark.parametrize("arguments", [{"interval_seconds": 0}, {"interval_seconds": 2},
                                       {"warn_after_seconds": 0}, {"max_window_seconds": 0.5}])
def test_nonsense_settings_are_refused(arguments: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        LoopWatch(Metrics(), **arguments)
