"""create_app reads the API keys and limits from a real NodeConfig."""

from __future__ import annotations

import json
from pathlib import Path

from _http_checks import check_problem
from aiohttp.test_utils import TestClient
from _http_support import FakeService, ProblemTestServer

from tokenvault import auth
from tokenvault.config import LimitsConfig, MemberConfig, NodeConfig
from tokenvault.api.http import create_app
from tokenvault.metrics import Metrics


def node_config(tmp_path: Path, key: str, limits: LimitsConfig) -> NodeConfig:
    return NodeConfig(
        node_id="n1",
        data_dir=tmp_path / "data",
        members=(MemberConfig(id="n1", peer_addr="127.0.0.1:8201", http_url="http://127.0.0.1:8101"),),
        api_keys=(auth.ApiKeyEntry(name="ops", sha256=auth.hash_api_key(key), scopes=frozenset({auth.TOKENIZE})),),
        limits=limits,
    )


async def test_keys_and_limits_come_from_the_config(tmp_path: Path) -> None:
    key = auth.generate_api_key()
    config = node_config(tmp_path, key, LimitsConfig(max_items=3, max_value_bytes=8, max_body_bytes=1024))
    service = FakeService()
    app = create_app(service, config, Metrics())
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    async with TestClient(ProblemTestServer(app, host="127.0.0.1", port=0)) as client:
        ok = await client.post("/v1/tokenize", data=json.dumps({"values": ["12345678"] * 3}), headers=headers)
        assert ok.status == 200
        assert service.tokenize_calls[0][0] == "ops"
        too_many = await client.post("/v1/tokenize", data=json.dumps({"values": ["a"] * 4}), headers=headers)
        check_problem(too_many.status, too_many.headers, await too_many.read(), 413)
        too_long = await client.post("/v1/tokenize", data=json.dumps({"values": ["123456789"]}), headers=headers)
        check_problem(too_long.status, too_long.headers, await too_long.read(), 400, ["123456789"])
        too_big = await client.post("/v1/tokenize", data=json.dumps({"values": ["a"]}) + " " * 1024, headers=headers)
        check_problem(too_big.status, too_big.headers, await too_big.read(), 413)
        # The key has only the tokenize scope.
        admin = await client.get("/v1/admin/epochs", headers=headers)
        check_problem(admin.status, admin.headers, await admin.read(), 403, [key])
        unknown = await client.get("/v1/admin/epochs", headers={"Authorization": f"Bearer {auth.generate_api_key()}"})
        check_problem(unknown.status, unknown.headers, await unknown.read(), 401)


async def test_connection_and_rate_limits_come_from_the_config(tmp_path: Path) -> None:
    """[http] timeouts and caps, [rate_limits] defaults and a key's own limits, as create_app applies them."""
    import asyncio
    from dataclasses import replace

    from tokenvault.config import HttpConfig, KeyRateLimitsConfig, RateLimitsConfig

    keys = {name: auth.generate_api_key() for name in ("ops", "bulk")}
    config = replace(
        node_config(tmp_path, keys["ops"], LimitsConfig()),
        api_keys=tuple(auth.ApiKeyEntry(name=name, sha256=auth.hash_api_key(key), scopes=frozenset({auth.TOKENIZE}))
                       for name, key in keys.items()),
        http=HttpConfig(header_timeout_ms=200, max_connections=50),
        rate_limits=RateLimitsConfig(tokenize_per_second=1, tokenize_burst=2,
                                     keys=(KeyRateLimitsConfig(name="bulk", tokenize_per_second=1,
                                                               tokenize_burst=5),)),
    )
    app = create_app(FakeService(), config, Metrics())
    body = json.dumps({"values": ["v"]})
    async with TestClient(ProblemTestServer(app, host="127.0.0.1", port=0)) as client:
        async def statuses(name: str, count: int) -> list[int]:
            headers = {"Authorization": f"Bearer {keys[name]}", "Content-Type": "application/json"}
            return [(await client.post("/v1/tokenize", data=body, headers=headers)).status for _ in range(count)]

        # Within a second a bucket gains at most one token: "ops" gets 2 or 3 of 4, "bulk" 5 or 6 of 7.
        assert (await statuses("ops", 4)).count(200) in (2, 3)
        assert (await statuses("bulk", 7)).count(200) in (5, 6)
        # The header timeout is the config's 200 ms: a connection that sends nothing is closed soon after.
        reader, writer = await asyncio.open_connection(client.host, client.port)
        try:
            assert await asyncio.wait_for(reader.read(), 5) == b""
        finally:
            writer.close()
