"""Fixtures for testing the HTTP layer alone (doubles in _http_support.py): the
in-memory FakeService, API keys, an aiohttp test client, and a live server in a
thread for sync clients (hypothesis fuzzing, schemathesis).

The live server is built by the ``app_factory`` fixture, so a test module (or a
conftest further down) can point the same tests at another application by
overriding that fixture; setting TOKENVAULT_HTTP_TARGET_URL (with
TOKENVAULT_HTTP_TARGET_KEY, an API key with all three scopes) points them at
an already running node instead.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
from _http_support import (
    FakeService,
    HttpTarget,
    KeyRing,
    LiveServer,
    ProblemTestServer,
    make_key_ring,
)
from aiohttp.test_utils import TestClient

from tokenvault.api.http import HttpApp, HttpLimits, build_app
from tokenvault.metrics import Metrics


@pytest.fixture
def key_ring() -> KeyRing:
    return make_key_ring()


@pytest.fixture
def service() -> FakeService:
    return FakeService()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def limits() -> HttpLimits:
    return HttpLimits()


@pytest.fixture
def app(service: FakeService, key_ring: KeyRing, limits: HttpLimits, metrics: Metrics) -> HttpApp:
    return build_app(service, key_ring.table(), limits, metrics)


@pytest.fixture
async def client(app: HttpApp) -> AsyncIterator[TestClient]:
    async with TestClient(ProblemTestServer(app, host="127.0.0.1", port=0)) as test_client:
        yield test_client


@pytest.fixture
async def make_client(
    service: FakeService, key_ring: KeyRing, metrics: Metrics
) -> AsyncIterator[Callable[..., Awaitable[TestClient]]]:
    """Builds extra clients on the same service with other limits."""
    clients: list[TestClient] = []

    async def factory(limits: HttpLimits) -> TestClient:
        app = build_app(service, key_ring.table(), limits, metrics)
        test_client = TestClient(ProblemTestServer(app, host="127.0.0.1", port=0))
        await test_client.start_server()
        clients.append(test_client)
        return test_client

    yield factory
    for test_client in clients:
        await test_client.close()


@pytest.fixture(scope="module")
def live_key_ring() -> KeyRing:
    return make_key_ring()


@pytest.fixture(scope="module")
def app_factory(live_key_ring: KeyRing) -> Callable[[], HttpApp]:
    """Builds the application the live server runs; override to test another app."""
    return lambda: build_app(FakeService(), live_key_ring.table(), HttpLimits(), Metrics())


@pytest.fixture(scope="module")
def http_target(app_factory: Callable[[], HttpApp], live_key_ring: KeyRing) -> Iterator[HttpTarget]:
    external_url = os.environ.get("TOKENVAULT_HTTP_TARGET_URL")
    if external_url:
        key = os.environ.get("TOKENVAULT_HTTP_TARGET_KEY", "")
        if not key:
            pytest.fail("TOKENVAULT_HTTP_TARGET_URL needs TOKENVAULT_HTTP_TARGET_KEY (a key with all scopes)")
        yield HttpTarget(base_url=external_url.rstrip("/"), full_key=key, is_fake=False)
        return
    server = LiveServer(app_factory)
    base_url = server.start()
    try:
        yield HttpTarget(base_url=base_url, full_key=live_key_ring.keys["full"], is_fake=True)
    finally:
        server.stop()
