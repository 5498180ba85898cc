"""tokenvault.metrics: a private registry per node, and what each method records."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any, cast

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tokenvault import auth
from tokenvault.api.http import HttpLimits, build_app
from tokenvault.metrics import ROLES, Metrics, RecentRender

from node_support import http_client


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body, _ = metrics.render()
    found = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_instances_have_separate_registries() -> None:
    first, second = Metrics(), Metrics()  # a second instance must not clash with the first
    first.observe_request("/v1/tokenize", "POST", 200, 0.002)
    assert ("tokenvault_http_requests_total", (("method", "POST"), ("route", "/v1/tokenize"), ("status", "200"))) \
        in samples(first)
    assert not any(name == "tokenvault_http_requests_total" for name, _ in samples(second))
    assert b"tokenvault_" not in prometheus_client.generate_latest(prometheus_client.REGISTRY)


def test_request_counter_and_latency_histogram() -> None:
    metrics = Metrics()
    for duration_seconds in (0.0004, 0.003, 0.2):
        metrics.observe_request("/v1/detokenize", "POST", 200, duration_seconds)
    metrics.observe_request("/v1/detokenize", "POST", 400, 0.0001)
    found = samples(metrics)
    labels = (("method", "POST"), ("route", "/v1/detokenize"))
    assert found[("tokenvault_http_requests_total", (*labels, ("status", "200")))] == 3
    assert found[("tokenvault_http_requests_total", (*labels, ("status", "400")))] == 1
    assert found[("tokenvault_http_request_duration_seconds_count", labels)] == 4
    assert found[("tokenvault_http_request_duration_seconds_bucket", (("le", "0.001"), *labels))] == 2
    assert found[("tokenvault_http_request_duration_seconds_sum", labels)] == pytest.approx(0.2035)


def test_vault_counters() -> None:
    metrics = Metrics()
    metrics.record_tokens_issued(100)
    metrics.record_tokens_issued(1)
    metrics.record_detokenized(found=7, unknown=2)
    metrics.record_replay("/v1/tokenize")
    found = samples(metrics)
    assert found[("tokenvault_tokens_issued_total", ())] == 101
    assert found[("tokenvault_values_detokenized_total", (("result", "found"),))] == 7
    assert found[("tokenvault_values_detokenized_total", (("result", "unknown"),))] == 2
    assert found[("tokenvault_idempotent_replays_total", (("route", "/v1/tokenize"),))] == 1


def test_replication_gauges_and_one_hot_role() -> None:
    metrics = Metrics()
    assert all(samples(metrics)[("tokenvault_role", (("role", role),))] == 0 for role in ROLES)
    metrics.set_replication(role="candidate", view=4, commit_index=10, applied_index=9, active_epoch=2)
    metrics.set_replication(role="primary", view=5, commit_index=12, applied_index=12, active_epoch=3)
    found = samples(metrics)
    assert {role: found[("tokenvault_role", (("role", role),))] for role in ROLES} == {
        "primary": 1, "backup": 0, "candidate": 0
    }
    assert found[("tokenvault_view", ())] == 5
    assert found[("tokenvault_commit_index", ())] == 12
    assert found[("tokenvault_applied_index", ())] == 12
    assert found[("tokenvault_active_epoch", ())] == 3
    with pytest.raises(ValueError):
        metrics.set_role("leader")
    # Repeated and changing roles (the gauges are only rewritten on a change).
    for role in ("primary", "backup", "backup", "primary"):
        metrics.set_replication(role=role, view=6, commit_index=12, applied_index=12, active_epoch=3)
        found = samples(metrics)
        assert [found[("tokenvault_role", (("role", name),))] for name in ROLES].count(1) == 1
        assert found[("tokenvault_role", (("role", role),))] == 1


def test_peer_gauges() -> None:
    metrics = Metrics()
    metrics.set_peer("n2", reachable=True, match_index=40)
    metrics.set_peer("n3", reachable=False)
    found = samples(metrics)
    assert found[("tokenvault_peer_reachable", (("peer", "n2"),))] == 1
    assert found[("tokenvault_peer_reachable", (("peer", "n3"),))] == 0
    assert found[("tokenvault_peer_match_index", (("peer", "n2"),))] == 40
    assert ("tokenvault_peer_match_index", (("peer", "n3"),)) not in found


def test_wal_sync_histograms() -> None:
    metrics = Metrics()
    metrics.observe_wal_sync(0.0008, entries=3, written_bytes=5000)
    metrics.observe_wal_sync(0.004, entries=200, written_bytes=2_000_000)
    found = samples(metrics)
    assert found[("tokenvault_wal_fsync_duration_seconds_count", ())] == 2
    assert found[("tokenvault_wal_fsync_duration_seconds_bucket", (("le", "0.001"),))] == 1
    assert found[("tokenvault_wal_batch_entries_sum", ())] == 203
    assert found[("tokenvault_wal_batch_entries_bucket", (("le", "4.0"),))] == 1
    assert found[("tokenvault_wal_batch_bytes_sum", ())] == 2_005_000


def test_render_content_type_is_prometheus_text() -> None:
    body, content_type = Metrics().render()
    assert content_type.startswith("text/plain")
    assert b"# TYPE tokenvault_http_requests_total counter" in body


def test_loop_stall_histogram_and_max_gauge() -> None:
    metrics = Metrics()
    for stall_seconds in (0.0004, 0.003, 0.3):
        metrics.observe_loop_stall(stall_seconds)
    metrics.set_loop_stall_max(0.3)
    found = samples(metrics)
    assert found[("tokenvault_event_loop_stall_seconds_count", ())] == 3
    assert found[("tokenvault_event_loop_stall_seconds_bucket", (("le", "0.001"),))] == 1
    assert found[("tokenvault_event_loop_stall_seconds_bucket", (("le", "0.25"),))] == 2
    assert found[("tokenvault_event_loop_stall_seconds_bucket", (("le", "0.5"),))] == 3
    assert found[("tokenvault_event_loop_stall_max_seconds", ())] == 0.3


async def test_a_flood_of_scrapes_costs_one_rendering_per_period() -> None:
    now = [100.0]
    started = asyncio.Event()
    release = asyncio.Event()
    count = [0]

    async def render() -> bytes:
        count[0] += 1
        started.set()
        await release.wait()
        return f"rendering {count[0]}".encode()

    recent = RecentRender(render, max_age_seconds=1.0, clock=lambda: now[0])
    # Fifty scrapes while the first rendering runs share it.
    waiting = [asyncio.ensure_future(recent.get()) for _ in range(50)]
    await started.wait()
    release.set()
    assert set(await asyncio.gather(*waiting)) == {b"rendering 1"}
    now[0] += 0.9
    assert await recent.get() == b"rendering 1"  # still within the period
    now[0] += 0.2
    assert await recent.get() == b"rendering 2"  # older than the period: rendered again
    assert recent.renderings == count[0] == 2


async def test_a_rendering_that_fails_fails_its_waiters_and_the_next_scrape_renders_again() -> None:
    attempts = [0]

    async def render() -> bytes:
        attempts[0] += 1
        if attempts[0] == 1:
            raise RuntimeError("a worker went away")
        return b"fine"

    recent = RecentRender(render)
    with pytest.raises(RuntimeError):
        await recent.get()
    assert await recent.get() == b"fine"
    assert attempts[0] == 2


async def test_metrics_page_floods_reach_the_core_once_per_period() -> None:
    """GET /metrics needs no key: a worker answers a flood of them with one call to its core a period."""
    calls = [0]

    async def node_metrics() -> str:
        calls[0] += 1
        return "tokenvault_example 1.0\n"

    app = build_app(cast(Any, object()), auth.ApiKeyTable({}), HttpLimits(), Metrics("worker"), node_metrics)
    async with http_client(app) as client:
        answers = await asyncio.gather(*(client.get("/metrics") for _ in range(40)))
        assert {answer.status for answer in answers} == {200}
        assert {await answer.text() for answer in answers} == {"tokenvault_example 1.0\n"}
    assert calls[0] == 1


def _exposed_series(metrics: Metrics) -> set[str]:
    """The series names a page of ``metrics`` declares (``# TYPE`` lines), children or not."""
    body, _ = metrics.render()
    return {line.split()[2] for line in body.decode().splitlines() if line.startswith("# TYPE ")}


def _documented_series() -> set[str]:
    """The names in the first column of docs/api.md's table of series."""
    names: set[str] = set()
    api = Path(__file__).resolve().parents[2] / "docs" / "api.md"
    for line in api.read_text(encoding="utf-8").splitlines():
        if line.startswith("| `tokenvault_"):
            names.update(re.findall(r"`(tokenvault_\w+)`", line.split("|")[1]))
    return names


def test_the_page_is_exactly_the_series_docs_api_md_lists_and_no_created_series() -> None:
    """A node's page (a node in one process; a worker's adds its view's series) declares every series
    docs/api.md lists and no other: no undocumented series, and no ``*_created`` twin of each counter
    and histogram, which prometheus_client adds unless told not to."""
    metrics = Metrics("node")
    metrics.observe_request("/v1/tokenize", "POST", 200, 0.002)  # a labelled child, which has a twin too
    exposed = _exposed_series(metrics) | _exposed_series(Metrics("worker"))
    assert not {name for name in exposed if name.endswith("_created")}
    assert exposed == _documented_series()
