"""The membership endpoints of the HTTP layer: the add / promote / remove cycle, validation (400), the
409 of a change that cannot be made, and the admin scope (401, 403)."""

from __future__ import annotations

import pytest
from _http_checks import check_problem
from _http_support import FakeService, KeyRing, ProblemTestServer
from aiohttp.test_utils import TestClient

from tokenvault.api.http import HttpLimits, build_app
from tokenvault.metrics import Metrics


async def expect_problem(response, status: int) -> dict:
    return check_problem(response.status, response.headers, await response.read(), status, ())


async def test_add_promote_list_and_remove_a_member(client: TestClient, key_ring: KeyRing) -> None:
    admin = key_ring.bearer("admin")
    added = await client.post("/v1/admin/members", json={"node_id": "n4", "peer_addr": "127.0.0.1:8204"},
                              headers=admin)
    assert added.status == 201
    assert (await added.json())["learners"] == ["n4"]
    promoted = await client.post("/v1/admin/members/n4/promote", headers=admin)
    assert promoted.status == 200 and "n4" in (await promoted.json())["voters"]
    listed = await (await client.get("/v1/admin/members", headers=admin)).json()
    assert {member["id"]: member["role"] for member in listed["members"]}["n4"] == "voter"
    assert {member["id"]: member["peer_addr"] for member in listed["members"]}["n4"] == "127.0.0.1:8204"
    removed = await client.post("/v1/admin/members/n4/remove", json={}, headers=admin)
    assert removed.status == 200 and "n4" not in (await removed.json())["voters"]


async def test_a_change_that_cannot_be_made_is_409_and_changes_nothing(
        client: TestClient, key_ring: KeyRing, service: FakeService) -> None:
    admin = key_ring.bearer("admin")
    before = service.membership
    problem = await expect_problem(await client.post("/v1/admin/members/n9/remove", headers=admin), 409)
    assert problem["type"].endswith("membership-change-refused")
    await expect_problem(await client.post("/v1/admin/members/n9/promote", headers=admin), 409)
    await expect_problem(await client.post("/v1/admin/members", json={"node_id": service.node_id,
                                                                      "peer_addr": "h:1"}, headers=admin), 409)
    assert service.membership == before


@pytest.mark.parametrize("document", [
    {"node_id": "n4"},
    {"peer_addr": "127.0.0.1:8204"},
    {"node_id": "", "peer_addr": "127.0.0.1:8204"},
    {"node_id": "-n4", "peer_addr": "127.0.0.1:8204"},
    {"node_id": "n" * 33, "peer_addr": "127.0.0.1:8204"},
    {"node_id": 4, "peer_addr": "127.0.0.1:8204"},
    {"node_id": "n4", "peer_addr": "127.0.0.1"},
    {"node_id": "n4", "peer_addr": "127.0.0.1:0"},
    {"node_id": "n4", "peer_addr": "bad host:1"},
    {"node_id": "n4", "peer_addr": ":1"},
    {"node_id": "n4", "peer_addr": "h" * 300 + ":1"},
    {"node_id": "n4", "peer_addr": 8204},
    {"node_id": "n4", "peer_addr": "127.0.0.1:8204", "voter": True},
])
async def test_a_malformed_add_is_400_and_changes_nothing(
        client: TestClient, key_ring: KeyRing, service: FakeService, document: dict) -> None:
    before = service.membership
    response = await client.post("/v1/admin/members", json=document, headers=key_ring.bearer("admin"))
    problem = await expect_problem(response, 400)
    assert "127.0.0.1" not in problem["detail"], "the input is never echoed"
    assert service.membership == before


async def test_a_membership_change_names_the_runtime_key_that_asked(key_ring: KeyRing) -> None:
    """The service checks that key again after a read barrier (a forwarded change names none: docs/security.md,
    "Revocation"); a bootstrap key names none. The service's table is the runtime lookup, as create_app wires it."""
    service = FakeService()
    app = build_app(service, key_ring.table(service.api_key), HttpLimits(), Metrics())
    async with TestClient(ProblemTestServer(app, host="127.0.0.1", port=0)) as client:
        created = await client.post("/v1/admin/keys", json={"name": "ops", "scopes": ["admin"]},
                                    headers=key_ring.bearer("admin"))
        runtime = await created.json()
        headers = {"Authorization": f"Bearer {runtime['key']}"}
        assert (await client.post("/v1/admin/members", json={"node_id": "n4", "peer_addr": "127.0.0.1:8204"},
                                  headers=headers)).status == 201
        assert (await client.post("/v1/admin/members/n4/remove", headers=headers)).status == 200
        assert (await client.post("/v1/admin/members/n9/remove", headers=key_ring.bearer("admin"))).status == 409
    assert service.member_change_keys == [runtime["id"], runtime["id"], None]


async def test_member_endpoints_need_the_admin_scope(client: TestClient, key_ring: KeyRing) -> None:
    await expect_problem(await client.get("/v1/admin/members"), 401)
    await expect_problem(await client.get("/v1/admin/members", headers=key_ring.bearer("tokenizer")), 403)
    await expect_problem(await client.post("/v1/admin/members/n1/remove", headers=key_ring.bearer("tokenizer")), 403)


async def test_a_peer_addr_with_a_lone_surrogate_is_400_and_changes_nothing(
        client: TestClient, key_ring: KeyRing, service: FakeService) -> None:
    before = service.membership
    body = b'{"node_id": "n4", "peer_addr": "h\\ud800:1"}'  # valid JSON, no valid UTF-8 string
    response = await client.post("/v1/admin/members", data=body,
                                 headers={**key_ring.bearer("admin"), "Content-Type": "application/json"})
    problem = await expect_problem(response, 400)
    assert problem["detail"] == "peer_addr must be host:port"
    assert service.membership == before
