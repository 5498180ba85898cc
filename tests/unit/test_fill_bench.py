"""bench/fill.py's helpers: unique card-like values, window statistics, the stall columns and the summary."""

from __future__ import annotations

import math
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import fill  # noqa: E402
from loadgen import Measurement  # noqa: E402

from tokenvault.metrics import Metrics  # noqa: E402


def test_values_are_16_digit_strings_that_never_repeat_within_a_run() -> None:
    values = fill.CardValues(seed=7)
    generated = [values.value(number) for number in range(200_000)]
    assert all(len(value) == 16 and value.isdigit() for value in generated)
    assert len(set(generated)) == len(generated)
    # Load processes take disjoint counters (n, n + P, ...) of the same permutation: no overlap either.
    first = {values.value(number) for number in range(0, 20_000, 2)}
    second = {values.value(number) for number in range(1, 20_000, 2)}
    assert not first & second
    assert fill.CardValues(seed=7).value(12345) == values.value(12345)
    assert fill.CardValues(seed=8).value(12345) != values.value(12345)
    assert math.gcd(values.multiplier, 10) == 1


def test_requests_are_counted_in_the_window_they_finish_in() -> None:
    assert fill.window_index(100.0, 100.0, 20.0) == 0
    assert fill.window_index(119.999, 100.0, 20.0) == 0
    assert fill.window_index(120.0, 100.0, 20.0) == 1
    assert fill.window_index(99.0, 100.0, 20.0) == 0  # never before the first


def test_windows_of_several_processes_merge_into_one_set_of_figures() -> None:
    total = Measurement()
    fill.merge(total, Measurement(requests=2, values=200, latencies_ms=[10.0, 30.0], errors=Counter({"HTTP 503": 1})))
    fill.merge(total, Measurement(requests=2, values=200, latencies_ms=[20.0, 400.0]))
    numbers = fill.figures(total, duration_seconds=2.0)
    assert numbers.values_per_second == 200
    assert numbers.p50_ms == 30.0
    assert numbers.max_ms == 400.0
    assert numbers.errors == 1
    empty = fill.figures(Measurement(), 2.0)
    assert empty.values_per_second == 0 and math.isnan(empty.p99_ms) and math.isnan(empty.max_ms)


def test_concurrency_is_split_evenly_over_the_load_processes() -> None:
    assert fill.split_concurrency(64, 1) == [64]
    assert fill.split_concurrency(64, 3) == [22, 21, 21]
    assert sum(fill.split_concurrency(10, 4)) == 10


def test_stall_counts_come_from_a_node_exposition_and_are_differenced_per_window() -> None:
    metrics = Metrics()
    for stall_seconds in (0.002, 0.2, 1.5):
        metrics.observe_loop_stall(stall_seconds)
    metrics.set_loop_stall_max(1.5)
    over, maximum = fill.stall_figures(metrics.render()[0].decode())
    assert over == {0.1: 2, 1.0: 1}
    assert maximum == 1.5
    assert fill.stall_figures("# nothing about stalls here\n") is None
    before = [fill.NodeSample("n1", stall_over={0.1: 2, 1.0: 1}), fill.NodeSample("n2", stall_over={0.1: 0, 1.0: 0})]
    after = [fill.NodeSample("n1", stall_over={0.1: 5, 1.0: 1}), fill.NodeSample("n2", stall_over={0.1: 1, 1.0: 0})]
    assert fill.stalls_gained(after, before, 0.1) == 4
    assert fill.stalls_gained(after, before, 1.0) == 0
    restarted = [fill.NodeSample("n1", stall_over={0.1: 1, 1.0: 0})]  # counters start again at zero
    assert fill.stalls_gained(restarted, before, 0.1) == 1
    assert fill.stalls_gained([fill.NodeSample("n1")], before, 0.1) is None


def test_a_window_line_flags_a_new_view_and_a_silent_node() -> None:
    previous = [fill.NodeSample("n1", health={"view": 1}), fill.NodeSample("n2", health={"view": 1})]
    samples = [fill.NodeSample("n1", health={"view": 2}, rss_bytes=3 * 2**20, disk_bytes=2**30,
                               stall_over={0.1: 1, 1.0: 0}, stall_max_seconds=0.25), fill.NodeSample("n2")]
    numbers = fill.figures(Measurement(requests=1, values=100, latencies_ms=[5.0]), 1.0)
    line = fill.window_line(20.0, 1_000_000, numbers, samples, previous, Counter({"HTTP 503": 2}), partial=False)
    assert "1,000,000" in line and "3/-" in line and "1024/-" in line and "250ms" in line
    assert "ELECTION: view 1 -> 2" in line
    assert "no /health from n2" in line and "HTTP 503: 2" in line


def test_the_summary_compares_the_first_and_the_last_full_window() -> None:
    result = fill.FillResult(tokens=3000, requests=30, seconds=2.5)
    for rate, p99, partial in ((1000.0, 10.0, False), (800.0, 20.0, False), (400.0, 5.0, True)):
        result.windows.append((1.0, fill.WindowFigures(rate, 1.0, p99, p99, 0), partial))
    lines = fill.summary_lines(result)
    assert "last/first: rate 0.80x, p99 2.00x" in lines
    assert lines[0].startswith("filled 3,000 tokens in 2.5 s (1,200 values/s on average)")


def test_disk_usage_counts_allocated_bytes(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"x" * 10_000)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b").write_bytes(b"y" * 5000)
    assert fill.disk_usage_bytes(tmp_path) >= 15_000
    assert fill.disk_usage_bytes(tmp_path / "missing") is None
    (tmp_path / "link").hardlink_to(tmp_path / "a")  # counted once, as du does
    assert fill.disk_usage_bytes(tmp_path) < 30_000


def test_the_stalls_of_every_event_loop_of_a_node_are_counted_its_workers_included() -> None:
    from tokenvault.api.core_calls import merge_expositions

    core, worker = Metrics(), Metrics("worker")
    core.observe_loop_stall(0.2)
    core.set_loop_stall_max(0.2)
    for stall_seconds in (0.3, 1.2, 2.0):
        worker.observe_loop_stall(stall_seconds)
    worker.set_loop_stall_max(2.0)
    exposition = merge_expositions([(None, core.render()[0].decode()), ("1", worker.render()[0].decode())])
    over, maximum = fill.stall_figures(exposition.decode())
    assert over == {0.1: 4, 1.0: 2}
    assert maximum == 2.0
