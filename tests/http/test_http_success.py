"""Every route's success shape, idempotent replays and the metrics they leave behind."""

from __future__ import annotations

import asyncio
import json

from aiohttp.test_utils import TestClient
from _http_support import FakeService, KeyRing, fake_token

from tokenvault.metrics import Metrics
from tokenvault.crypto.tokens import is_token, parse_token

JSON = {"Content-Type": "application/json"}


async def tokenize(client: TestClient, key_ring: KeyRing, values: list[str], name: str = "tokenizer", **headers: str):
    return await client.post(
        "/v1/tokenize", data=json.dumps({"values": values}), headers={**JSON, **key_ring.bearer(name), **headers}
    )


async def test_health_shape_without_authentication(client: TestClient, service: FakeService) -> None:
    response = await client.get("/health")
    assert response.status == 200
    assert response.content_type == "application/json"
    assert await response.json() == service.health()
    assert set(await response.json()) == {
        "status", "node_id", "role", "view", "primary_id", "commit_index", "applied_index", "active_epoch"
    }


async def test_tokenize_returns_one_token_per_value_in_order(
    client: TestClient, key_ring: KeyRing, service: FakeService
) -> None:
    values = ["alice@example.com", "4111 1111 1111 1111", "ünïcödé ✓", "alice@example.com"]
    response = await tokenize(client, key_ring, values)
    assert response.status == 200
    assert response.headers["Cache-Control"] == "no-store"
    assert "Idempotent-Replayed" not in response.headers
    document = await response.json()
    assert document == {"epoch": 1, "tokens": [fake_token(1, value) for value in values]}
    assert all(is_token(token) and parse_token(token).epoch == document["epoch"] for token in document["tokens"])
    # The principal passed to the service is the key's configured name, not the key.
    assert service.tokenize_calls == [("tokenizer", values, None)]


async def test_value_of_exactly_max_value_bytes_is_accepted(client: TestClient, key_ring: KeyRing) -> None:
    four_byte_characters = "\U0001f600" * 1024  # 4096 UTF-8 bytes in 1024 characters
    response = await tokenize(client, key_ring, ["x" * 4096, four_byte_characters])
    assert response.status == 200


async def test_thousand_items_are_accepted(client: TestClient, key_ring: KeyRing) -> None:
    values = [f"value-{index}" for index in range(1000)]
    response = await tokenize(client, key_ring, values)
    assert response.status == 200
    assert len((await response.json())["tokens"]) == 1000


async def test_detokenize_returns_values_and_null_for_unknown(client: TestClient, key_ring: KeyRing) -> None:
    tokens = (await (await tokenize(client, key_ring, ["a", "b"])).json())["tokens"]
    unknown = fake_token(9, "never issued")
    response = await client.post(
        "/v1/detokenize", data=json.dumps({"tokens": [tokens[1], unknown, tokens[0]]}),
        headers={**JSON, **key_ring.bearer("detokenizer")},
    )
    assert response.status == 200
    assert response.headers["Cache-Control"] == "no-store"
    assert await response.json() == {"values": ["b", None, "a"]}


async def test_detokenize_accepts_well_formed_foreign_tokens(client: TestClient, key_ring: KeyRing) -> None:
    # A body of 26 characters is the contract's minimum; such a token is unknown, not malformed.
    response = await client.post(
        "/v1/detokenize", data=json.dumps({"tokens": ["tv123_" + "a" * 26]}),
        headers={**JSON, **key_ring.bearer("detokenizer")},
    )
    assert response.status == 200
    assert await response.json() == {"values": [None]}


async def test_rotate_epoch_with_object_or_empty_body(client: TestClient, key_ring: KeyRing) -> None:
    first = await client.post("/v1/admin/epochs", data="{}", headers={**JSON, **key_ring.bearer("admin")})
    assert first.status == 201
    assert await first.json() == {"epoch": 2}
    second = await client.post("/v1/admin/epochs", headers=key_ring.bearer("admin"))
    assert second.status == 201
    assert await second.json() == {"epoch": 3}
    # Tokens issued afterwards carry the new epoch.
    document = await (await tokenize(client, key_ring, ["after"])).json()
    assert document["epoch"] == 3 and parse_token(document["tokens"][0]).epoch == 3


async def test_list_epochs_shape(client: TestClient, key_ring: KeyRing) -> None:
    await client.post("/v1/admin/epochs", headers=key_ring.bearer("admin"))
    response = await client.get("/v1/admin/epochs", headers=key_ring.bearer("admin"))
    assert response.status == 200
    assert await response.json() == {
        "active_epoch": 2,
        "epochs": [
            {"epoch": 1, "created_at": "2024-01-01T00:00:00.000Z", "state": "retired"},
            {"epoch": 2, "created_at": "2024-01-02T00:00:00.000Z", "state": "active"},
        ],
    }


async def test_cluster_view_shape(client: TestClient, key_ring: KeyRing, service: FakeService) -> None:
    response = await client.get("/v1/admin/cluster", headers=key_ring.bearer("full"))
    assert response.status == 200
    assert await response.json() == await service.cluster_view()


async def test_metrics_exposition_counts_requests(client: TestClient, key_ring: KeyRing) -> None:
    await tokenize(client, key_ring, ["counted"])
    await client.get("/no/such/path")
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    text = await response.text()
    assert 'tokenvault_http_requests_total{method="POST",route="/v1/tokenize",status="200"} 1.0' in text
    # Unknown paths share one label value, so clients cannot create unbounded series.
    assert 'tokenvault_http_requests_total{method="GET",route="unmatched",status="404"} 1.0' in text
    assert 'tokenvault_http_request_duration_seconds_count{method="POST",route="/v1/tokenize"} 1.0' in text
    assert "counted" not in text


async def test_unusual_methods_share_one_metrics_label(client: TestClient, metrics: Metrics) -> None:
    response = await client.request("PROPFIND", "/health")
    assert response.status == 405
    text = metrics.render()[0].decode()
    assert 'method="OTHER",route="unmatched",status="405"' in text
    assert "PROPFIND" not in text


# ---------------------------------------------------------------- idempotency


async def test_replay_returns_first_response_with_header(client: TestClient, key_ring: KeyRing) -> None:
    first = await tokenize(client, key_ring, ["v1", "v2"], **{"Idempotency-Key": "order-17"})
    first_body = await first.read()
    assert first.status == 200 and "Idempotent-Replayed" not in first.headers
    await client.post("/v1/admin/epochs", headers=key_ring.bearer("admin"))
    again = await tokenize(client, key_ring, ["v1", "v2"], **{"Idempotency-Key": "order-17"})
    assert again.status == 200
    assert again.headers["Idempotent-Replayed"] == "true"
    # Unchanged even though the active epoch moved on in between.
    assert await again.read() == first_body


async def test_rotation_replay(client: TestClient, key_ring: KeyRing, metrics: Metrics) -> None:
    headers = {**key_ring.bearer("admin"), "Idempotency-Key": "rotate-once"}
    first = await client.post("/v1/admin/epochs", data="{}", headers={**headers, **JSON})
    again = await client.post("/v1/admin/epochs", headers=headers)
    assert (first.status, again.status) == (201, 201)
    assert await again.json() == await first.json() == {"epoch": 2}
    assert again.headers["Idempotent-Replayed"] == "true"
    assert 'tokenvault_idempotent_replays_total{route="/v1/admin/epochs"} 1.0' in metrics.render()[0].decode()


async def test_idempotency_keys_are_scoped_per_api_key(client: TestClient, key_ring: KeyRing) -> None:
    first = await tokenize(client, key_ring, ["one"], name="tokenizer", **{"Idempotency-Key": "shared"})
    other = await tokenize(client, key_ring, ["two"], name="full", **{"Idempotency-Key": "shared"})
    assert (first.status, other.status) == (200, 200)
    assert "Idempotent-Replayed" not in other.headers


async def test_idempotency_key_boundaries_accepted(client: TestClient, key_ring: KeyRing) -> None:
    for key in ("k", "~" * 255, "with inner spaces !\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}"):
        response = await tokenize(client, key_ring, [key], **{"Idempotency-Key": key})
        assert response.status == 200, key


async def test_in_flight_repeat_then_completion(client: TestClient, key_ring: KeyRing, service: FakeService) -> None:
    service.tokenize_gate = asyncio.Event()
    headers = {"Idempotency-Key": "slow"}
    first = asyncio.ensure_future(tokenize(client, key_ring, ["slow value"], **headers))
    deadline = asyncio.get_running_loop().time() + 5
    while not service.in_flight:
        assert asyncio.get_running_loop().time() < deadline, "the first request never reached the service"
        await asyncio.sleep(0.001)
    second = await tokenize(client, key_ring, ["slow value"], **headers)
    assert second.status == 409
    service.tokenize_gate.set()
    assert (await first).status == 200
    third = await tokenize(client, key_ring, ["slow value"], **headers)
    assert third.status == 200 and third.headers["Idempotent-Replayed"] == "true"


async def test_head_follows_get(client: TestClient, key_ring: KeyRing) -> None:
    assert (await client.head("/health")).status == 200
    assert (await client.head("/v1/admin/epochs", headers=key_ring.bearer("admin"))).status == 200
    assert (await client.head("/v1/admin/epochs")).status == 401
