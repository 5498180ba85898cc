"""The runtime key and audit endpoints of the HTTP layer: validation (400, 404), scopes (401, 403),
and authentication by a runtime key that the service's replicated table holds."""

from __future__ import annotations

import pytest
from _http_checks import check_problem
from _http_support import FakeService, KeyRing, ProblemTestServer
from aiohttp.test_utils import TestClient

from tokenvault.api.http import HttpLimits, build_app
from tokenvault.metrics import Metrics

JSON = {"Content-Type": "application/json"}


async def expect_problem(response, status: int) -> dict:
    return check_problem(response.status, response.headers, await response.read(), status, ())


async def test_create_list_and_revoke_a_key(client: TestClient, key_ring: KeyRing) -> None:
    created = await client.post("/v1/admin/keys", json={"name": "ci.job-1", "scopes": ["tokenize", "detokenize"]},
                                headers=key_ring.bearer("admin"))
    assert created.status == 201
    body = await created.json()
    assert body["key"].startswith(f"tvk1_{body['id']}_") and body["scopes"] == ["detokenize", "tokenize"]
    listed = await (await client.get("/v1/admin/keys", headers=key_ring.bearer("admin"))).json()
    assert listed == {"keys": [{key: body[key] for key in ("id", "name", "scopes", "created_at")}]}
    assert body["key"] not in str(listed)
    revoked = await client.post(f"/v1/admin/keys/{body['id']}/revoke", headers=key_ring.bearer("admin"))
    assert revoked.status == 200 and await revoked.json() == {"id": body["id"], "revoked": True}
    again = await client.post(f"/v1/admin/keys/{body['id']}/revoke", headers=key_ring.bearer("admin"))
    await expect_problem(again, 404)


@pytest.mark.parametrize("document", [
    {"name": "", "scopes": ["tokenize"]},
    {"name": "-leading-dash", "scopes": ["tokenize"]},
    {"name": "x" * 65, "scopes": ["tokenize"]},
    {"name": "spaces are not allowed", "scopes": ["tokenize"]},
    {"name": 7, "scopes": ["tokenize"]},
    {"name": "ok", "scopes": []},
    {"name": "ok", "scopes": "tokenize"},
    {"name": "ok", "scopes": ["root"]},
    {"name": "ok", "scopes": ["tokenize", "tokenize"]},
    {"name": "ok", "scopes": [1]},
    {"name": "ok"},
    {"name": "ok", "scopes": ["tokenize"], "extra": 1},
    {"name": "tvk_" + "k" * 43, "scopes": ["tokenize"]},  # a key pasted as its name (logged and audited)
    {"name": "tvk1_0123456789abcdef_" + "k" * 20, "scopes": ["tokenize"]},
])
async def test_a_malformed_key_request_is_400_and_creates_nothing(
        client: TestClient, key_ring: KeyRing, service: FakeService, document: dict) -> None:
    response = await client.post("/v1/admin/keys", json=document, headers=key_ring.bearer("admin"))
    await expect_problem(response, 400)
    assert service.runtime_keys == {}


@pytest.mark.parametrize("path", ["/v1/admin/keys/not-hex/revoke", "/v1/admin/keys/0123456789ABCDEF/revoke",
                                  "/v1/admin/keys/0123456789abcdef0/revoke"])
async def test_revoking_a_malformed_id_is_404(client: TestClient, key_ring: KeyRing, path: str) -> None:
    await expect_problem(await client.post(path, headers=key_ring.bearer("admin")), 404)


@pytest.mark.parametrize("method,path", [("POST", "/v1/admin/keys"), ("GET", "/v1/admin/keys"),
                                         ("POST", "/v1/admin/keys/0123456789abcdef/revoke"),
                                         ("GET", "/v1/admin/audit")])
async def test_key_and_audit_endpoints_need_the_admin_scope(
        client: TestClient, key_ring: KeyRing, method: str, path: str) -> None:
    await expect_problem(await client.request(method, path), 401)
    await expect_problem(await client.request(method, path, headers=key_ring.bearer("full") | {"Authorization":
                                                                                                 "Bearer tvk1_x"}), 401)
    await expect_problem(await client.request(method, path, headers=key_ring.bearer("detokenizer")), 403)


@pytest.mark.parametrize("query", ["after=-1", "after=abc", "after=1.5", "after=", "limit=0", "limit=1001",
                                   "limit=01", "after=1&after=2", "page=2", "after=99999999999999999999",
                                   "limit=%201"])
async def test_a_malformed_audit_query_is_400(client: TestClient, key_ring: KeyRing, query: str) -> None:
    await expect_problem(await client.get(f"/v1/admin/audit?{query}", headers=key_ring.bearer("admin")), 400)


async def test_an_audit_page_with_valid_bounds(client: TestClient, key_ring: KeyRing) -> None:
    for query in ("", "?after=0&limit=1", "?limit=1000", f"?after={2**63 - 2}"):
        response = await client.get(f"/v1/admin/audit{query}", headers=key_ring.bearer("admin"))
        assert response.status == 200, query
        assert await response.json() == {"records": [], "last_seq": 0, "next_after": None, "anchor": None}


async def test_a_runtime_key_authenticates_until_it_is_revoked(key_ring: KeyRing) -> None:
    """With the service's table as the runtime lookup (as create_app wires it), a created key
    authenticates with its scopes, a wrong secret under the same id does not, and revoked it is 401."""
    service = FakeService()
    app = build_app(service, key_ring.table(service.api_key), HttpLimits(), Metrics())
    async with TestClient(ProblemTestServer(app, host="127.0.0.1", port=0)) as client:
        created = await (await client.post("/v1/admin/keys", json={"name": "reader", "scopes": ["detokenize"]},
                                           headers=key_ring.bearer("admin"))).json()
        bearer = {"Authorization": f"Bearer {created['key']}"}
        detokenized = await client.post("/v1/detokenize", json={"tokens": ["tv1_" + "a" * 32]}, headers=bearer)
        assert detokenized.status == 200
        await expect_problem(await client.get("/v1/admin/keys", headers=bearer), 403)
        forged = created["key"][:-4] + ("aaaa" if not created["key"].endswith("aaaa") else "bbbb")
        await expect_problem(await client.post("/v1/detokenize", json={"tokens": ["tv1_" + "a" * 32]},
                                               headers={"Authorization": f"Bearer {forged}"}), 401)
        await client.post(f"/v1/admin/keys/{created['id']}/revoke", headers=key_ring.bearer("admin"))
        await expect_problem(await client.post("/v1/detokenize", json={"tokens": ["tv1_" + "a" * 32]},
                                               headers=bearer), 401)


async def test_the_admin_reads_that_reach_the_primary_name_the_runtime_key_that_asked(key_ring: KeyRing) -> None:
    """The service checks that key again after a read barrier (a forwarded read names none: docs/security.md,
    "Revocation"); a bootstrap key names none. The service's table is the runtime lookup, as create_app wires it."""
    service = FakeService()
    app = build_app(service, key_ring.table(service.api_key), HttpLimits(), Metrics())
    async with TestClient(ProblemTestServer(app, host="127.0.0.1", port=0)) as client:
        created = await (await client.post("/v1/admin/keys", json={"name": "ops", "scopes": ["admin"]},
                                           headers=key_ring.bearer("admin"))).json()
        for headers in ({"Authorization": f"Bearer {created['key']}"}, key_ring.bearer("admin")):
            for path in ("/v1/admin/keys", "/v1/admin/epochs", "/v1/admin/members", "/v1/admin/epochs/1/tokens"):
                assert (await client.get(path, headers=headers)).status == 200, path
    assert service.admin_read_keys == [(read, key_id) for key_id in (created["id"], None)
                                       for read in ("keys", "epochs", "members", "epoch tokens")]


async def test_a_detokenize_answer_names_the_request_id_of_its_audit_record(
        client: TestClient, key_ring: KeyRing, service: FakeService) -> None:
    first = await client.post("/v1/detokenize", json={"tokens": ["tv1_" + "a" * 32]},
                              headers=key_ring.bearer("detokenizer"))
    second = await client.post("/v1/detokenize", json={"tokens": ["tv1_" + "a" * 32]},
                               headers=key_ring.bearer("detokenizer"))
    ids = [response.headers["X-Request-Id"] for response in (first, second)]
    assert all(len(request_id) == 16 for request_id in ids) and ids[0] != ids[1]
    assert [actor.request_id for actor in service.detokenize_actors] == ids
    assert {(actor.name, actor.key_id, actor.node) for actor in service.detokenize_actors} == {
        ("detokenizer", None, service.node_id)}
