"""Idempotency keys of runtime API keys are scoped by the key's id, not its name (docs/api.md).

The HTTP layer serves a real in-process node (node_support.py): the keys are created
through POST /v1/admin/keys and replicated into the node's store, the tokenize
requests go through the real service and its idempotency records. The test runs
twice: with the HTTP layer over the node's service (one process), and over a
worker's RemoteService talking to the core's CoreCalls over a real channel, with
the runtime key table pushed as the core pushes it to its workers.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from node_support import RunningNode, http_client, wait_until
from test_service import worker_of
from tokenvault import auth
from tokenvault.api.http import HttpLimits, build_app
from tokenvault.api.remote import KEYS_TOPIC, RemoteService
from tokenvault.errors import problem_type
from tokenvault.metrics import Metrics

ADMIN_KEY = auth.generate_api_key()
BOOTSTRAP_CI_KEY = auth.generate_api_key()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@contextlib.asynccontextmanager
async def in_a_worker(running: RunningNode) -> AsyncIterator[tuple[RemoteService, Callable[[], None]]]:
    """A worker's RemoteService on a real channel to this node's CoreCalls (test_service.worker_of), and
    how the core pushes the runtime key table to it (as WorkerPool.push_keys does after an applied create)."""
    remote, calls, channels = await worker_of(running)
    try:
        yield remote, lambda: channels[0].push(KEYS_TOPIC, calls.api_key_rows())
    finally:
        for channel in reversed(channels):
            await channel.close()


@pytest.mark.parametrize("where", ["core", "worker"])
async def test_runtime_keys_with_the_same_name_do_not_share_idempotency_keys(single: RunningNode, where: str) -> None:
    """Two runtime keys named "ci" (and a bootstrap key of that name) use the same Idempotency-Key with
    different bodies: each gets its own answer, not the other's replay and not 422. The same key and
    body from one of them replays its own answer, and another body from it is 422."""
    async with contextlib.AsyncExitStack() as stack:
        if where == "core":
            service: Any = single.service
            push_keys: Callable[[], None] = lambda: None  # noqa: E731 - the node's store is the table
        else:
            service, push_keys = await stack.enter_async_context(in_a_worker(single))
        table = auth.ApiKeyTable([
            auth.ApiKeyEntry("admin", auth.hash_api_key(ADMIN_KEY), frozenset({auth.ADMIN})),
            auth.ApiKeyEntry("ci", auth.hash_api_key(BOOTSTRAP_CI_KEY), frozenset({auth.TOKENIZE})),
        ], service.api_key)  # the runtime lookup create_app wires
        client = await stack.enter_async_context(http_client(build_app(service, table, HttpLimits(), Metrics())))
        created = []
        for _ in range(2):
            response = await client.post("/v1/admin/keys", json={"name": "ci", "scopes": ["tokenize"]},
                                         headers=bearer(ADMIN_KEY))
            assert response.status == 201, await response.text()
            created.append(await response.json())
        assert created[0]["name"] == created[1]["name"] == "ci" and created[0]["id"] != created[1]["id"]
        push_keys()
        await wait_until(lambda: all(service.api_key(entry["id"]) for entry in created), 5.0,
                         "both runtime keys in the key table")
        first_key, second_key = (entry["key"] for entry in created)

        async def tokenize(key: str, value: str) -> tuple[int, str | None, Any]:
            response = await client.post("/v1/tokenize", json={"values": [value]},
                                         headers={**bearer(key), "Idempotency-Key": "order-17"})
            return response.status, response.headers.get("Idempotent-Replayed"), await response.json()

        first = await tokenize(first_key, "first-value")
        second = await tokenize(second_key, "second-value")
        bootstrap = await tokenize(BOOTSTRAP_CI_KEY, "third-value")
        assert [answer[:2] for answer in (first, second, bootstrap)] == [(200, None)] * 3, (first, second, bootstrap)
        tokens = [answer[2]["tokens"][0] for answer in (first, second, bootstrap)]
        assert await single.service.detokenize(tokens) == ["first-value", "second-value", "third-value"]

        assert await tokenize(first_key, "first-value") == (200, "true", first[2])
        assert await tokenize(second_key, "second-value") == (200, "true", second[2])
        mismatch = await tokenize(first_key, "second-value")
        assert (mismatch[0], mismatch[2]["type"]) == (422, problem_type("idempotency-mismatch")), mismatch
