"""One test (or more) for every status of the contract's error table, and the validation order.

Every error response is checked to be problem+json that quotes none of the
submitted values, tokens or keys (check_problem).
"""

from __future__ import annotations

import asyncio
import gzip
import json
import zlib
from collections.abc import Awaitable, Callable

import pytest
from _http_checks import check_problem
from aiohttp.test_utils import TestClient
from _http_support import FakeService, KeyRing

from tokenvault.api.http import HttpLimits
from tokenvault.core.store_layout import StoreDamaged

JSON = {"Content-Type": "application/json"}
MARKER = "SECRET-value-7c1e"  # a submitted value that must never come back
MARKER_TOKEN = "tv1_" + "q" * 32
TOKENIZE_BODY = json.dumps({"values": [f"alpha-{index}" for index in range(20)]}).encode()

ClientFactory = Callable[[HttpLimits], Awaitable[TestClient]]


async def expect_problem(response, status: int, submitted: tuple[str, ...] = ()) -> dict:
    body = await response.read()
    return check_problem(response.status, response.headers, body, status, submitted)


async def post(client: TestClient, path: str, body: bytes | str | None, headers: dict[str, str]):
    return await client.post(path, data=body, headers=headers)


# ---------------------------------------------------------------- 400


INVALID_TOKENIZE_BODIES = [
    pytest.param(b"{not json " + MARKER.encode(), id="not-json"),
    pytest.param(b'{"values": ["' + MARKER.encode() + b'"]', id="truncated"),
    pytest.param(b'{"values": ["\xff' + MARKER.encode() + b'"]}', id="not-utf8"),
    pytest.param(b"\xef\xbb\xbf" + json.dumps({"values": [MARKER]}).encode(), id="utf8-bom"),
    pytest.param(json.dumps([MARKER]).encode(), id="array-not-object"),
    pytest.param(json.dumps(MARKER).encode(), id="string-not-object"),
    pytest.param(b"null", id="null"),
    pytest.param(b"", id="empty-body"),
    pytest.param(json.dumps({}).encode(), id="missing-member"),
    pytest.param(json.dumps({"values": [MARKER], "extra": MARKER}).encode(), id="unknown-member"),
    pytest.param(b'{"values": ["a"], "values": ["' + MARKER.encode() + b'"]}', id="duplicate-member"),
    pytest.param(json.dumps({"values": MARKER}).encode(), id="values-not-list"),
    pytest.param(json.dumps({"values": {"a": MARKER}}).encode(), id="values-object"),
    pytest.param(json.dumps({"values": []}).encode(), id="empty-list"),
    pytest.param(json.dumps({"values": [MARKER, ""]}).encode(), id="empty-value"),
    pytest.param(json.dumps({"values": [MARKER, 17]}).encode(), id="integer-value"),
    pytest.param(json.dumps({"values": [MARKER, None]}).encode(), id="null-value"),
    pytest.param(json.dumps({"values": [MARKER, True]}).encode(), id="boolean-value"),
    pytest.param(json.dumps({"values": [[MARKER]]}).encode(), id="nested-list-value"),
    pytest.param(json.dumps({"values": [MARKER + "x" * 4096]}).encode(), id="value-too-long"),
    pytest.param(json.dumps({"values": [MARKER, "é" * 2049]}).encode(), id="value-too-many-utf8-bytes"),
    pytest.param(b'{"values": ["' + MARKER.encode() + b'\\ud800"]}', id="lone-surrogate"),
    pytest.param(b'{"values": [NaN]}', id="nan"),
    pytest.param(b'{"values": [1e999999]}', id="huge-number"),
    pytest.param(b'{"values": [' + b"9" * 5000 + b"]}", id="integer-too-many-digits"),
    pytest.param(b'{"values": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", id="deeply-nested"),
]


@pytest.mark.parametrize("body", INVALID_TOKENIZE_BODIES)
async def test_invalid_tokenize_bodies_are_400(
    client: TestClient, key_ring: KeyRing, service: FakeService, body: bytes
) -> None:
    response = await post(client, "/v1/tokenize", body, {**JSON, **key_ring.bearer("tokenizer")})
    await expect_problem(response, 400, (MARKER,))
    assert service.tokenize_calls == []


INVALID_DETOKENIZE_TOKENS = [
    pytest.param([MARKER_TOKEN, MARKER], id="not-a-token"),
    pytest.param([MARKER_TOKEN.upper()], id="uppercase"),
    pytest.param(["tv0_" + "a" * 32], id="epoch-zero"),
    pytest.param(["tv01_" + "a" * 32], id="leading-zero-epoch"),
    pytest.param(["tv1_" + "a" * 25], id="body-too-short"),
    pytest.param(["tv1_" + "a" * 31 + "1"], id="digit-outside-base32"),
    pytest.param([MARKER_TOKEN + "\n"], id="trailing-newline"),
    pytest.param(["tv1_" + "a" * 200], id="longer-than-128"),
    pytest.param(["tv١_" + "a" * 32], id="non-ascii-digit"),
    pytest.param([MARKER_TOKEN, 5], id="integer"),
    pytest.param([None], id="null"),
    pytest.param([], id="empty-list"),
]


@pytest.mark.parametrize("tokens", INVALID_DETOKENIZE_TOKENS)
async def test_invalid_detokenize_tokens_are_400(
    client: TestClient, key_ring: KeyRing, service: FakeService, tokens: list
) -> None:
    body = json.dumps({"tokens": tokens})
    response = await post(client, "/v1/detokenize", body, {**JSON, **key_ring.bearer("detokenizer")})
    await expect_problem(response, 400, tuple(token for token in tokens if isinstance(token, str)))
    assert service.detokenize_calls == []


@pytest.mark.parametrize(
    "body",
    [b'{"epoch": 5}', b"[]", b"{", b'"' + MARKER.encode() + b'"', b'{"' + MARKER.encode() + b'": 1}', b"null", b" "],
    ids=["member", "array", "invalid-json", "string", "marker-member", "null", "whitespace"],
)
async def test_invalid_rotate_bodies_are_400(client: TestClient, key_ring: KeyRing, service: FakeService, body: bytes) -> None:
    response = await post(client, "/v1/admin/epochs", body, {**JSON, **key_ring.bearer("admin")})
    await expect_problem(response, 400, (MARKER,))
    assert service.active_epoch == 1


@pytest.mark.parametrize(
    "key",
    ["", " ", "x" * 256, "ключ", "tab\there"],
    ids=["empty", "only-space", "too-long", "non-ascii", "tab"],
)
async def test_invalid_idempotency_key_is_400(
    client: TestClient, key_ring: KeyRing, service: FakeService, key: str
) -> None:
    # Sent as UTF-8 bytes through latin-1. aiohttp's client refuses other control
    # characters; test_http_fuzz sends those over a raw socket.
    headers = {**JSON, **key_ring.bearer("tokenizer"), "Idempotency-Key": key.encode("utf-8").decode("latin-1")}
    response = await post(client, "/v1/tokenize", json.dumps({"values": ["v"]}), headers)
    await expect_problem(response, 400, (key,) if len(key) > 3 else ())
    assert service.tokenize_calls == []


async def test_two_idempotency_keys_are_400(client: TestClient, key_ring: KeyRing) -> None:
    headers = [("Content-Type", "application/json"), ("Idempotency-Key", "a1"), ("Idempotency-Key", "b2"),
               *key_ring.bearer("admin").items()]
    response = await client.post("/v1/admin/epochs", data="{}", headers=headers)
    await expect_problem(response, 400)


# ---------------------------------------------------------------- 401 / 403


PROTECTED = [
    ("POST", "/v1/tokenize", json.dumps({"values": [MARKER]}), "tokenize"),
    ("POST", "/v1/detokenize", json.dumps({"tokens": [MARKER_TOKEN]}), "detokenize"),
    ("POST", "/v1/admin/epochs", "{}", "admin"),
    ("GET", "/v1/admin/epochs", None, "admin"),
    ("GET", "/v1/admin/cluster", None, "admin"),
    ("GET", "/v1/admin/backup", None, "admin"),
]


def _authorization_cases(key_ring: KeyRing) -> list[list[tuple[str, str]]]:
    real_key = key_ring.keys["full"]
    return [
        [],
        [("Authorization", "")],
        [("Authorization", "Bearer")],
        [("Authorization", f"Basic {real_key}")],
        [("Authorization", real_key)],
        [("Authorization", "Bearer tvk_" + "A" * 43)],
        [("Authorization", "Bearer " + real_key[:-1])],
        [("Authorization", "Bearer " + real_key + "x" * 300)],
        [("Authorization", "Bearer " + real_key), ("Authorization", "Bearer " + real_key)],
    ]


@pytest.mark.parametrize(("method", "path", "body", "scope"), PROTECTED)
async def test_missing_or_unknown_key_is_401_with_challenge(
    client: TestClient, key_ring: KeyRing, service: FakeService, method: str, path: str, body: str | None, scope: str
) -> None:
    challenges = []
    for authorization in _authorization_cases(key_ring):
        headers = [("Content-Type", "application/json"), *authorization]
        response = await client.request(method, path, data=body, headers=headers)
        await expect_problem(response, 401, (MARKER, MARKER_TOKEN, *key_ring.keys.values()))
        challenges.append(response.headers["WWW-Authenticate"])
    # docs/api.md, 401: the realm always, and RFC 6750's error when a credential was sent.
    realm = 'Bearer realm="tokenvault"'
    assert set(challenges) <= {realm, realm + ', error="invalid_request"', realm + ', error="invalid_token"'}
    assert challenges[0] == realm  # no Authorization header
    assert challenges[5] == realm + ', error="invalid_token"'  # a well-formed key nobody holds
    assert challenges[-1] == realm + ', error="invalid_request"'  # two Authorization headers
    assert service.tokenize_calls == [] and service.detokenize_calls == [] and service.active_epoch == 1
    assert service.backups_opened == 0


async def test_bearer_scheme_is_case_insensitive(client: TestClient, key_ring: KeyRing) -> None:
    response = await client.get("/v1/admin/epochs", headers={"Authorization": "bearer " + key_ring.keys["admin"]})
    assert response.status == 200


@pytest.mark.parametrize(("method", "path", "body", "scope"), PROTECTED)
async def test_key_without_scope_is_403(
    client: TestClient, key_ring: KeyRing, service: FakeService, method: str, path: str, body: str | None, scope: str
) -> None:
    lacking = [name for name, scopes in key_ring.scopes.items() if scope not in scopes]
    assert len(lacking) == 2
    for name in lacking:
        response = await client.request(method, path, data=body, headers={**JSON, **key_ring.bearer(name)})
        await expect_problem(response, 403, (MARKER, MARKER_TOKEN, *key_ring.keys.values()))
        assert response.headers["WWW-Authenticate"] == \
            f'Bearer realm="tokenvault", error="insufficient_scope", scope="{scope}"'
    assert service.tokenize_calls == [] and service.detokenize_calls == [] and service.active_epoch == 1
    assert service.backups_opened == 0


# ---------------------------------------------------------------- 404 / 405


@pytest.mark.parametrize("path", ["/", "/v1", "/v1/tokenize/extra", "/v2/tokenize", "/" + MARKER, "/health/"])
async def test_unknown_path_is_404(client: TestClient, path: str) -> None:
    response = await client.get(path)
    await expect_problem(response, 404, (MARKER,))


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/tokenize"), ("PUT", "/v1/tokenize"), ("GET", "/v1/detokenize"), ("DELETE", "/v1/admin/epochs"),
     ("POST", "/health"), ("POST", "/metrics"), ("POST", "/v1/admin/cluster"), ("POST", "/v1/admin/backup")],
)
async def test_wrong_method_is_405_with_allow(client: TestClient, method: str, path: str) -> None:
    response = await client.request(method, path)
    await expect_problem(response, 405)
    assert response.headers["Allow"]


async def test_the_allow_header_names_every_method_of_the_path(client: TestClient) -> None:
    response = await client.request("DELETE", "/v1/admin/epochs")
    await expect_problem(response, 405)
    assert response.headers["Allow"] == "GET,HEAD,POST"
    # The backup has no HEAD: it would take a checkpoint only to throw it away.
    response = await client.post("/v1/admin/backup")
    await expect_problem(response, 405)
    assert response.headers["Allow"] == "GET"


async def test_head_of_a_get_route_is_its_answer_without_the_body(client: TestClient) -> None:
    response = await client.head("/health")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("application/json")
    assert await response.read() == b""


@pytest.mark.parametrize("path", ["/v1/admin/keys/" + "a" * 16 + "%2Fx/revoke", "/v1/admin/keys//revoke",
                                  "/v1/admin/members/n1/demote", "/v1/admin/members/n1%2Fn2/promote/x",
                                  "/v1/admin/epochs/1%2F2/destroy", "/v1/Tokenize", "/v1//tokenize"])
async def test_a_path_that_fits_no_route_or_no_parameter_is_404(
        client: TestClient, key_ring: KeyRing, service: FakeService, path: str) -> None:
    response = await client.post(path, data=b"{}", headers={**JSON, **key_ring.bearer("admin")})
    await expect_problem(response, 404)
    assert service.lifecycle_calls == []


async def test_an_expectation_other_than_100_continue_is_417_without_echo(client: TestClient, key_ring: KeyRing) -> None:
    response = await post(client, "/v1/tokenize", json.dumps({"values": ["v"]}),
                          {**JSON, **key_ring.bearer("tokenizer"), "Expect": MARKER})
    await expect_problem(response, 417, (MARKER,))


async def test_an_expectation_is_judged_only_once_the_body_would_be_read(
        client: TestClient, key_ring: KeyRing, service: FakeService) -> None:
    """docs/api.md, "Validation order": a request without a key is 401 whatever its Expect says (an
    unauthenticated client learns nothing more), a key without the scope 403; an empty Expect names no
    expectation and is ignored. (A fuzzed request with a stray Expect once got 417 before its 401.)"""
    body = json.dumps({"values": ["v"]})
    await expect_problem(await post(client, "/v1/tokenize", body, {**JSON, "Expect": MARKER}), 401, (MARKER,))
    await expect_problem(await post(client, "/v1/tokenize", body,
                                    {**JSON, **key_ring.bearer("detokenizer"), "Expect": MARKER}), 403, (MARKER,))
    for empty in ("", " "):
        response = await post(client, "/v1/tokenize", body, {**JSON, **key_ring.bearer("tokenizer"), "Expect": empty})
        assert response.status == 200, empty
    assert len(service.tokenize_calls) == 2


async def test_expect_100_continue_gets_the_interim_answer_before_the_body_is_sent(
        client: TestClient, key_ring: KeyRing, service: FakeService) -> None:
    body = json.dumps({"values": ["v"]}).encode()
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        head = (f"POST /v1/tokenize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Authorization: Bearer {key_ring.keys['tokenizer']}\r\nExpect: 100-continue\r\n"
                f"Content-Length: {len(body)}\r\n\r\n")
        writer.write(head.encode())
        assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(body)
        status_line = await asyncio.wait_for(reader.readline(), 5)
        assert status_line.startswith(b"HTTP/1.1 200 ")
    finally:
        writer.close()
    assert service.tokenize_calls and service.tokenize_calls[-1][1] == ["v"]


# ---------------------------------------------------------------- 409 / 422


async def test_in_flight_repeat_is_409(client: TestClient, key_ring: KeyRing, service: FakeService) -> None:
    service.tokenize_gate = asyncio.Event()
    headers = {**JSON, **key_ring.bearer("tokenizer"), "Idempotency-Key": "k-409"}
    body = json.dumps({"values": [MARKER]})
    first = asyncio.ensure_future(post(client, "/v1/tokenize", body, headers))
    deadline = asyncio.get_running_loop().time() + 5
    while not service.in_flight:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.001)
    conflict = await expect_problem(await post(client, "/v1/tokenize", body, headers), 409, (MARKER,))
    assert conflict["type"] == "urn:tokenvault:problem:idempotency-in-flight"
    service.tokenize_gate.set()
    assert (await first).status == 200


async def test_same_key_different_body_is_422(client: TestClient, key_ring: KeyRing) -> None:
    headers = {**JSON, **key_ring.bearer("tokenizer"), "Idempotency-Key": "k-422"}
    assert (await post(client, "/v1/tokenize", json.dumps({"values": ["first"]}), headers)).status == 200
    response = await post(client, "/v1/tokenize", json.dumps({"values": [MARKER]}), headers)
    mismatch = await expect_problem(response, 422, (MARKER,))
    assert mismatch["type"] == "urn:tokenvault:problem:idempotency-mismatch"


# ---------------------------------------------------------------- 413


async def test_too_many_items_is_413(client: TestClient, key_ring: KeyRing, service: FakeService) -> None:
    values = [f"{MARKER}-{index}" for index in range(1001)]
    response = await post(client, "/v1/tokenize", json.dumps({"values": values}), {**JSON, **key_ring.bearer("full")})
    await expect_problem(response, 413, (MARKER,))
    tokens = [MARKER_TOKEN] * 1001
    response = await post(client, "/v1/detokenize", json.dumps({"tokens": tokens}), {**JSON, **key_ring.bearer("full")})
    await expect_problem(response, 413, (MARKER_TOKEN,))
    assert service.tokenize_calls == [] and service.detokenize_calls == []


async def test_default_body_limit_is_8_mib(client: TestClient, key_ring: KeyRing) -> None:
    limit = 8 * 1024 * 1024
    document = json.dumps({"values": [MARKER]}).encode()
    at_limit = document + b" " * (limit - len(document))
    response = await post(client, "/v1/tokenize", at_limit, {**JSON, **key_ring.bearer("tokenizer")})
    assert response.status == 200
    over = at_limit + b" "
    response = await post(client, "/v1/tokenize", over, {**JSON, **key_ring.bearer("tokenizer")})
    await expect_problem(response, 413, (MARKER,))


async def test_oversized_chunked_body_is_413_problem(make_client: ClientFactory, key_ring: KeyRing) -> None:
    small = await make_client(HttpLimits(max_body_bytes=2048))

    async def chunks():
        # No Content-Length: only aiohttp's client_max_size check while reading can stop this body.
        yield b'{"values": ["' + MARKER.encode()
        for _ in range(10):
            yield b"x" * 1024
        yield b'"]}'

    response = await small.post("/v1/tokenize", data=chunks(), headers={**JSON, **key_ring.bearer("tokenizer")})
    assert "Content-Length" not in response.request_info.headers
    await expect_problem(response, 413, (MARKER,))


async def test_compressed_chunked_body_over_the_limit_as_sent_is_413(
        make_client: ClientFactory, key_ring: KeyRing, service: FakeService) -> None:
    """A chunked body has no declared length to check: its bytes as sent are held to max_body_bytes as they
    arrive, as its decoded bytes are (this one decodes to a small document, through empty deflate blocks)."""
    small = await make_client(HttpLimits(max_body_bytes=2048))
    compressor = zlib.compressobj(wbits=16 + zlib.MAX_WBITS)
    start = compressor.compress(json.dumps({"values": [MARKER]}).encode()) + compressor.flush(zlib.Z_SYNC_FLUSH)
    empty_block = b"\x00\x00\x00\xff\xff"  # a stored block of no bytes, not the last

    async def chunks():
        yield start
        for _ in range(10):
            yield empty_block * 200
        yield compressor.flush()

    headers = {**JSON, **key_ring.bearer("tokenizer"), "Content-Encoding": "gzip"}
    response = await small.post("/v1/tokenize", data=chunks(), headers=headers)
    assert "Content-Length" not in response.request_info.headers
    await expect_problem(response, 413, (MARKER,))
    assert service.tokenize_calls == []


async def test_declared_length_over_limit_is_413_before_reading(make_client: ClientFactory, key_ring: KeyRing) -> None:
    small = await make_client(HttpLimits(max_body_bytes=2048))
    body = json.dumps({"values": [MARKER + "x" * 3000]})
    response = await small.post("/v1/tokenize", data=body, headers={**JSON, **key_ring.bearer("tokenizer")})
    await expect_problem(response, 413, (MARKER,))


async def test_rotate_body_over_limit_is_413(make_client: ClientFactory, key_ring: KeyRing) -> None:
    small = await make_client(HttpLimits(max_body_bytes=2048))
    response = await small.post("/v1/admin/epochs", data="{}" + " " * 4096, headers={**JSON, **key_ring.bearer("admin")})
    await expect_problem(response, 413)


async def test_gzip_bomb_is_refused(make_client: ClientFactory, key_ring: KeyRing) -> None:
    small = await make_client(HttpLimits(max_body_bytes=4096))
    document = b'{"values": ["' + b"a" * 1_000_000 + b'"]}'
    compressed = gzip.compress(document)
    assert len(compressed) < 4096
    headers = {**JSON, **key_ring.bearer("tokenizer"), "Content-Encoding": "gzip"}
    response = await small.post("/v1/tokenize", data=compressed, headers=headers)
    await expect_problem(response, 413)


async def test_broken_gzip_is_400(client: TestClient, key_ring: KeyRing) -> None:
    headers = {**JSON, **key_ring.bearer("tokenizer"), "Content-Encoding": "gzip"}
    response = await client.post("/v1/tokenize", data=b"\x1f\x8b\x08\x00garbage" + MARKER.encode(), headers=headers)
    await expect_problem(response, 400, (MARKER,))


@pytest.mark.parametrize("encoding,body", [
    pytest.param("gzip", gzip.compress(TOKENIZE_BODY) + MARKER.encode(), id="gzip-then-junk"),
    pytest.param("gzip", gzip.compress(TOKENIZE_BODY) + gzip.compress(MARKER.encode()), id="two-gzip-members"),
    pytest.param("deflate", zlib.compress(TOKENIZE_BODY) + MARKER.encode(), id="deflate-then-junk"),
])
async def test_data_after_the_end_of_a_compressed_body_is_400(
        client: TestClient, key_ring: KeyRing, service: FakeService, encoding: str, body: bytes) -> None:
    """Before, it was dropped unread and the request served on what came before it."""
    headers = {**JSON, **key_ring.bearer("tokenizer"), "Content-Encoding": encoding}
    response = await client.post("/v1/tokenize", data=body, headers=headers)
    await expect_problem(response, 400, (MARKER,))
    assert service.tokenize_calls == []


async def send_in_pieces(client: TestClient, pieces: list[bytes]) -> bytes:
    """Each piece read by the server (its handler too) before the next is sent: the server runs on this
    event loop, and the pause lets it (asyncio sends each piece at once, with TCP_NODELAY)."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.01)
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


def gzip_head(key: str, length: int) -> bytes:
    return (f"POST /v1/tokenize HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Encoding: gzip\r\nContent-Length: {length}\r\n"
            "Connection: close\r\n\r\n").encode()


async def test_a_gzip_body_sent_byte_by_byte_is_read_whole(
        client: TestClient, key_ring: KeyRing, service: FakeService) -> None:
    """Most of its bytes decode to nothing alone (the header, the trailer, many of the data's): before,
    the first such piece read as the end of the body, and the request was 400 "the body is empty"."""
    body = gzip.compress(TOKENIZE_BODY)
    received = await send_in_pieces(
        client, [gzip_head(key_ring.keys["tokenizer"], len(body))] + [body[i:i + 1] for i in range(len(body))])
    assert received.startswith(b"HTTP/1.1 200 "), received[:300]
    assert service.tokenize_calls[-1][1] == json.loads(TOKENIZE_BODY)["values"]


async def test_a_gzip_body_cut_short_is_400_when_its_last_piece_decodes_to_nothing(
        client: TestClient, key_ring: KeyRing, service: FakeService) -> None:
    """Its size field never comes and its CRC comes alone: before, it was served (200)."""
    cut = gzip.compress(TOKENIZE_BODY)[:-4]
    received = await send_in_pieces(client, [gzip_head(key_ring.keys["tokenizer"], len(cut)) + cut[:-4], cut[-4:]])
    head, _, body = received.partition(b"\r\n\r\n")
    headers = dict(line.split(": ", 1) for line in head.decode("latin-1").split("\r\n")[1:])
    check_problem(int(head.split(b" ", 2)[1]), headers, body, 400)
    assert service.tokenize_calls == []


# ---------------------------------------------------------------- 415


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
     "application/json; charset=latin-1", "application/jsonx", "text/json"],
)
async def test_non_json_content_type_is_415(
    client: TestClient, key_ring: KeyRing, service: FakeService, content_type: str | None
) -> None:
    headers = key_ring.bearer("full")
    if content_type is not None:
        headers["Content-Type"] = content_type
    body = json.dumps({"values": [MARKER]}).encode()
    response = await client.post("/v1/tokenize", data=body, headers=headers, skip_auto_headers=["Content-Type"])
    await expect_problem(response, 415, (MARKER,))
    detokenize = await client.post(
        "/v1/detokenize", data=json.dumps({"tokens": [MARKER_TOKEN]}).encode(), headers=headers,
        skip_auto_headers=["Content-Type"],
    )
    await expect_problem(detokenize, 415, (MARKER_TOKEN,))
    assert service.tokenize_calls == []


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "application/JSON", "application/merge-patch+json"])
async def test_json_content_type_variants_are_accepted(client: TestClient, key_ring: KeyRing, content_type: str) -> None:
    headers = {**key_ring.bearer("tokenizer"), "Content-Type": content_type}
    response = await client.post("/v1/tokenize", data=json.dumps({"values": ["v"]}), headers=headers)
    assert response.status == 200


# ---------------------------------------------------------------- 503 and unexpected errors


@pytest.mark.parametrize(("method", "path", "body", "scope"), PROTECTED)
async def test_unavailable_is_503_with_retry_after(
    client: TestClient, key_ring: KeyRing, service: FakeService, method: str, path: str, body: str | None, scope: str
) -> None:
    service.unavailable = True
    response = await client.request(method, path, data=body, headers={**JSON, **key_ring.bearer("full")})
    await expect_problem(response, 503, (MARKER, MARKER_TOKEN))
    assert int(response.headers["Retry-After"]) >= 1


def test_the_in_flight_bound_defaults_to_256_requests_per_node_and_is_the_configs() -> None:
    """docs/api.md, limits: requests in progress per node (every request with a body), 256 by default,
    ``[http] max_inflight_requests``."""
    from types import SimpleNamespace

    from tokenvault.config import HttpConfig, LimitsConfig, RateLimitsConfig

    def limits(http: HttpConfig) -> HttpLimits:
        return HttpLimits.from_config(SimpleNamespace(limits=LimitsConfig(), http=http,
                                                      rate_limits=RateLimitsConfig()))

    assert HttpLimits().max_inflight_requests == 256 == limits(HttpConfig()).max_inflight_requests
    assert limits(HttpConfig(max_inflight_requests=3)).max_inflight_requests == 3


def test_limits_built_without_a_config_are_those_of_a_config_that_leaves_them_out() -> None:
    """An app built in-process (tests, tools) and a node started from a node.toml without [http] or
    [limits] hold the same limits: HttpLimits takes its defaults from the config's."""
    from dataclasses import asdict, replace
    from types import SimpleNamespace

    from tokenvault.api.http import connections_allowed
    from tokenvault.config import HttpConfig, LimitsConfig, RateLimitsConfig

    configured = HttpLimits.from_config(SimpleNamespace(limits=LimitsConfig(), http=HttpConfig(),
                                                        rate_limits=RateLimitsConfig()))
    built = HttpLimits()
    # No rate limits: the config says so with a rate of 0 per kind, the bare limits by no bucket.
    assert all(bucket.unlimited for bucket in configured.rate_limits.values())
    assert built.rate_limits == {} and configured.key_rate_limits == {} == built.key_rate_limits
    expected = asdict(replace(built, max_connections=min(built.max_connections, connections_allowed()),
                              rate_limits=configured.rate_limits))
    assert asdict(configured) == expected


# Every route with a body but tokenize and detokenize (above), each of which takes an in-flight slot.
BOUNDED_PATHS = ("/v1/admin/epochs", "/v1/admin/keys", "/v1/admin/keys/0123456789abcdef/revoke",
                 "/v1/admin/members", "/v1/admin/members/n2/promote", "/v1/admin/members/n2/remove",
                 "/v1/tokens/delete", "/v1/retokenize", "/v1/admin/epochs/1/destroy", "/v1/admin/audit/trim")


async def test_in_flight_bound_is_503(make_client: ClientFactory, key_ring: KeyRing, service: FakeService) -> None:
    bounded = await make_client(HttpLimits(max_inflight_requests=1))
    service.tokenize_gate = asyncio.Event()
    headers = {**JSON, **key_ring.bearer("full")}
    first = asyncio.ensure_future(bounded.post("/v1/tokenize", data=json.dumps({"values": ["a"]}), headers=headers))
    deadline = asyncio.get_running_loop().time() + 5
    while not service.tokenize_calls:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.001)
    second = await bounded.post("/v1/detokenize", data=json.dumps({"tokens": [MARKER_TOKEN]}), headers=headers)
    await expect_problem(second, 503, (MARKER_TOKEN,))
    assert second.headers["Retry-After"] == "1"
    # docs/api.md, "Limits": every request with a body takes a slot, the admin and lifecycle ones too.
    for path in BOUNDED_PATHS:
        refused = await bounded.post(path, data="{}", headers=headers)
        body = await expect_problem(refused, 503, ())
        assert body["type"].endswith(":overloaded") and refused.headers["Retry-After"] == "1", path
    # Health and metrics are never refused by the bound.
    assert (await bounded.get("/health")).status == 200
    assert (await bounded.get("/metrics")).status == 200
    service.tokenize_gate.set()
    assert (await first).status == 200
    third = await bounded.post("/v1/detokenize", data=json.dumps({"tokens": [MARKER_TOKEN]}), headers=headers)
    assert third.status == 200


async def test_a_damaged_store_met_by_a_request_is_503_naming_nothing_of_it(
    client: TestClient, key_ring: KeyRing, service: FakeService
) -> None:
    """docs/failure-modes.md, "A damaged store file": the node is stopping; the request is 503, as a
    node of HTTP workers answers it, not a 500."""
    service.crash_with = StoreDamaged("the store is damaged: Corruption: block checksum mismatch in 000017.sst")
    response = await post(client, "/v1/tokenize", json.dumps({"values": [MARKER]}),
                          {**JSON, **key_ring.bearer("tokenizer")})
    body = await expect_problem(response, 503, ("000017.sst", "Corruption", MARKER))
    assert body["type"].endswith(":unavailable") and response.headers["Retry-After"] == "1"


async def test_unexpected_exception_is_500_without_its_message(
    client: TestClient, key_ring: KeyRing, service: FakeService
) -> None:
    service.crash_with = RuntimeError(f"bug while handling {MARKER}")
    response = await post(client, "/v1/tokenize", json.dumps({"values": [MARKER]}), {**JSON, **key_ring.bearer("tokenizer")})
    await expect_problem(response, 500, (MARKER, "RuntimeError"))
    # The node keeps serving.
    service.crash_with = None
    assert (await client.get("/health")).status == 200


# ---------------------------------------------------------------- validation order


async def test_authentication_comes_before_body_checks(client: TestClient, key_ring: KeyRing) -> None:
    # Not JSON, wrong content type, and no key: the missing key answers.
    response = await client.post("/v1/tokenize", data=b"\xff" + MARKER.encode(), headers={"Content-Type": "text/plain"})
    await expect_problem(response, 401, (MARKER,))
    response = await client.post(
        "/v1/tokenize", data=b"\xff", headers={"Content-Type": "text/plain", **key_ring.bearer("detokenizer")}
    )
    await expect_problem(response, 403)


async def test_idempotency_header_comes_before_content_type(client: TestClient, key_ring: KeyRing) -> None:
    headers = {"Content-Type": "text/plain", "Idempotency-Key": "x" * 300, **key_ring.bearer("tokenizer")}
    response = await client.post("/v1/tokenize", data=b"{}", headers=headers)
    await expect_problem(response, 400)


async def test_content_type_comes_before_size(make_client: ClientFactory, key_ring: KeyRing) -> None:
    small = await make_client(HttpLimits(max_body_bytes=2048))
    response = await small.post("/v1/tokenize", data=b"x" * 5000, headers={"Content-Type": "text/plain", **key_ring.bearer("tokenizer")})
    await expect_problem(response, 415)


async def test_size_comes_before_json_syntax(make_client: ClientFactory, key_ring: KeyRing) -> None:
    small = await make_client(HttpLimits(max_body_bytes=2048))
    response = await small.post("/v1/tokenize", data=b"{" * 5000, headers={**JSON, **key_ring.bearer("tokenizer")})
    await expect_problem(response, 413)


async def test_item_count_comes_before_item_checks(make_client: ClientFactory, key_ring: KeyRing) -> None:
    small = await make_client(HttpLimits(max_items=3))
    body = json.dumps({"values": [1, "", None, MARKER]})
    response = await small.post("/v1/tokenize", data=body, headers={**JSON, **key_ring.bearer("tokenizer")})
    await expect_problem(response, 413, (MARKER,))


async def test_first_invalid_item_is_named_by_position(client: TestClient, key_ring: KeyRing) -> None:
    body = json.dumps({"values": ["ok", MARKER, 3, ""]})
    response = await client.post("/v1/tokenize", data=body, headers={**JSON, **key_ring.bearer("tokenizer")})
    problem = await expect_problem(response, 400, (MARKER,))
    assert "values[2]" in problem["detail"]
