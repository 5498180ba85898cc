"""The lifecycle routes: delete, re-tokenize, epoch destroy and epoch token pages (FakeService behind)."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import TestClient
from _http_checks import check_problem
from _http_support import FakeService, KeyRing, fake_token


async def expect_problem(response, status: int, submitted: tuple[str, ...] = ()) -> dict:
    return check_problem(response.status, response.headers, await response.read(), status, submitted)


async def tokens_of(client: TestClient, key_ring: KeyRing, values: list[str]) -> list[str]:
    response = await client.post("/v1/tokenize", json={"values": values}, headers=key_ring.bearer("full"))
    return (await response.json())["tokens"]


async def test_delete_needs_the_delete_scope_and_answers_the_count(
        client: TestClient, key_ring: KeyRing, service: FakeService) -> None:
    tokens = await tokens_of(client, key_ring, ["a-value", "b-value"])
    for name in ("admin", "tokenizer", "detokenizer"):
        await expect_problem(await client.post("/v1/tokens/delete", json={"tokens": tokens},
                                               headers=key_ring.bearer(name)), 403)
    assert service.lifecycle_calls == []
    response = await client.post("/v1/tokens/delete", json={"tokens": tokens + [tokens[0]]},
                                 headers=key_ring.bearer("full"))
    assert response.status == 200 and await response.json() == {"deleted": 2}
    assert response.headers["Cache-Control"] == "no-store"
    detokenized = await client.post("/v1/detokenize", json={"tokens": tokens}, headers=key_ring.bearer("full"))
    assert (await detokenized.json())["values"] == [None, None]


@pytest.mark.parametrize("path", ["/v1/tokens/delete", "/v1/retokenize"])
@pytest.mark.parametrize("document", [{}, {"tokens": []}, {"tokens": ["secret-looking value"]},
                                      {"tokens": [fake_token(1, "x")], "extra": 1}, {"tokens": "tv1_x"}])
async def test_malformed_lifecycle_bodies_are_400_without_an_echo(
        client: TestClient, key_ring: KeyRing, service: FakeService, path: str, document: dict) -> None:
    await expect_problem(await client.post(path, json=document, headers=key_ring.bearer("full")), 400,
                         submitted=("secret-looking value",))
    assert service.lifecycle_calls == []


async def test_too_many_tokens_are_413(client: TestClient, key_ring: KeyRing) -> None:
    tokens = [fake_token(1, str(number)) for number in range(1001)]
    for path in ("/v1/tokens/delete", "/v1/retokenize"):
        await expect_problem(await client.post(path, json={"tokens": tokens}, headers=key_ring.bearer("full")), 413)


async def test_retokenize_answers_the_active_epochs_tokens_and_null_for_unknown(
        client: TestClient, key_ring: KeyRing, service: FakeService) -> None:
    (old,) = await tokens_of(client, key_ring, ["card-holder"])
    await client.post("/v1/admin/epochs", headers=key_ring.bearer("admin"))
    await expect_problem(await client.post("/v1/retokenize", json={"tokens": [old]},
                                           headers=key_ring.bearer("tokenizer")), 403)
    unknown = fake_token(1, "never")
    response = await client.post("/v1/retokenize", json={"tokens": [old, unknown]}, headers=key_ring.bearer("full"))
    assert response.status == 200
    assert await response.json() == {"epoch": 2, "tokens": [fake_token(2, "card-holder"), None]}


async def test_destroy_refuses_the_active_epoch_then_destroys_and_lists_it(
        client: TestClient, key_ring: KeyRing, service: FakeService) -> None:
    (old,) = await tokens_of(client, key_ring, ["shredded"])
    admin = key_ring.bearer("admin")
    problem = await expect_problem(await client.post("/v1/admin/epochs/1/destroy", headers=admin), 409)
    assert problem["type"].endswith(":epoch-active")
    await client.post("/v1/admin/epochs", headers=admin)
    await expect_problem(await client.post("/v1/admin/epochs/1/destroy", headers=key_ring.bearer("tokenizer")), 403)
    for _ in range(2):  # idempotent
        response = await client.post("/v1/admin/epochs/1/destroy", json={}, headers=admin)
        assert response.status == 200 and await response.json() == {"epoch": 1, "state": "destroyed"}
    listed = await (await client.get("/v1/admin/epochs", headers=admin)).json()
    assert [epoch["state"] for epoch in listed["epochs"]] == ["destroyed", "active"]
    problem = await expect_problem(await client.post("/v1/retokenize", json={"tokens": [old]},
                                                     headers=key_ring.bearer("full")), 422)
    assert problem["type"].endswith(":epoch-destroyed") and "tokens[0]" in problem["detail"]


@pytest.mark.parametrize("epoch", ["0", "01", "-1", "x", "4294967296", "99999999999999999999"])
async def test_an_epoch_path_that_is_no_epoch_number_is_404(client: TestClient, key_ring: KeyRing, epoch: str) -> None:
    await expect_problem(await client.post(f"/v1/admin/epochs/{epoch}/destroy", headers=key_ring.bearer("admin")),
                         404)
    await expect_problem(await client.get(f"/v1/admin/epochs/{epoch}/tokens", headers=key_ring.bearer("admin")), 404)


async def test_destroy_takes_only_an_empty_object(client: TestClient, key_ring: KeyRing) -> None:
    await client.post("/v1/admin/epochs", headers=key_ring.bearer("admin"))
    await expect_problem(await client.post("/v1/admin/epochs/1/destroy", json={"force": True},
                                           headers=key_ring.bearer("admin")), 400)


async def test_epoch_token_pages_walk_the_epoch(client: TestClient, key_ring: KeyRing) -> None:
    tokens = await tokens_of(client, key_ring, [f"v{number}" for number in range(7)])
    admin = key_ring.bearer("admin")
    seen, after = [], None
    while True:
        query = {"limit": "3"} | ({"after": after} if after else {})
        page = await (await client.get("/v1/admin/epochs/1/tokens", params=query, headers=admin)).json()
        seen += page["tokens"]
        if page["next_after"] is None:
            break
        after = page["next_after"]
    assert sorted(seen) == sorted(tokens)
    for query in ({"limit": "0"}, {"limit": "1001"}, {"after": "not-a-token"}, {"other": "1"},
                  [("limit", "1"), ("limit", "2")]):
        await expect_problem(await client.get("/v1/admin/epochs/1/tokens", params=query, headers=admin), 400)
    await expect_problem(await client.get("/v1/admin/epochs/1/tokens", headers=key_ring.bearer("tokenizer")), 403)
