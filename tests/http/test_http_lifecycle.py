"""Version 2 tokenize and detokenize through HTTP, served by the real NodeService of an in-process
node (a cluster of one): card and digits tokens, the detokenize epoch, masked reveal, metadata and
expiry, and their problem+json refusals, which never echo a value."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from _http_checks import check_problem
from _http_support import KeyRing, ProblemTestServer
from aiohttp.test_utils import TestClient

from tokenvault import auth
from tokenvault.api.http import HttpLimits, build_app
from tokenvault.crypto.formats import luhn_valid
from tokenvault.metrics import Metrics

# The in-process node helpers live beside the node tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from node_support import RunningNode, start_cluster, wait_until  # noqa: E402

JSON = {"Content-Type": "application/json"}
CARD = "4111 1111 1111 1111"
CARD_DIGITS = "4111111111111111"


def lifecycle_key_ring() -> KeyRing:
    scopes = {
        "admin": frozenset({auth.ADMIN}),
        "tokenizer": frozenset({auth.TOKENIZE}),
        "detokenizer": frozenset({auth.DETOKENIZE}),
        "masked": frozenset({auth.DETOKENIZE_MASKED}),
        "both": frozenset({auth.DETOKENIZE, auth.DETOKENIZE_MASKED}),
    }
    return KeyRing(keys={name: auth.generate_api_key() for name in scopes}, scopes=scopes)


@pytest.fixture
async def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[RunningNode]:
    monkeypatch.delenv("TOKENVAULT_MASTER_KEY", raising=False)
    cluster = await start_cluster(tmp_path, 1)
    try:
        await cluster.wait_for_stable_primary()
        yield cluster.nodes[0]
    finally:
        await cluster.close()


@pytest.fixture
def keys() -> KeyRing:
    return lifecycle_key_ring()


@pytest.fixture
async def client(node: RunningNode, keys: KeyRing) -> AsyncIterator[TestClient]:
    app = build_app(node.service, keys.table(), HttpLimits(), Metrics())
    async with TestClient(ProblemTestServer(app, host="127.0.0.1", port=0)) as test_client:
        yield test_client


async def post(client: TestClient, keys: KeyRing, path: str, document: object, key: str) -> tuple[int, dict, bytes]:
    response = await client.post(path, data=json.dumps(document), headers={**JSON, **keys.bearer(key)})
    body = await response.read()
    return response.status, dict(response.headers), body


async def tokenize(client: TestClient, keys: KeyRing, document: dict) -> dict:
    status, _, body = await post(client, keys, "/v1/tokenize", document, "tokenizer")
    assert status == 200, body
    return json.loads(body)


async def detokenize(client: TestClient, keys: KeyRing, document: dict, key: str = "detokenizer") -> dict:
    status, _, body = await post(client, keys, "/v1/detokenize", document, key)
    assert status == 200, body
    return json.loads(body)


async def test_card_tokens_keep_shape_and_round_trip(client: TestClient, keys: KeyRing, node: RunningNode) -> None:
    first = await tokenize(client, keys, {"values": [CARD, "378282246310005"], "format": "card"})
    card_token, amex_token = first["tokens"]
    assert len(card_token) == 16 and card_token.isdigit() and card_token[-4:] == "1111"
    assert len(amex_token) == 15 and amex_token[-4:] == "0005"
    assert not luhn_valid(card_token) and not luhn_valid(amex_token)
    # Deterministic, separators ignored; the repeat is answered as a read.
    reads_before = node.node.metrics.tokenize_answered_as_read._value.get()
    again = await tokenize(client, keys, {"values": [CARD_DIGITS], "format": "card"})
    assert again == {"epoch": first["epoch"], "tokens": [card_token]}
    assert node.node.metrics.tokenize_answered_as_read._value.get() == reads_before + 1
    answer = await detokenize(client, keys, {"tokens": [card_token, amex_token, "4000000000000002"]})
    assert answer == {"values": [CARD_DIGITS, "378282246310005", None]}


async def test_digits_tokens_and_their_limits(client: TestClient, keys: KeyRing) -> None:
    tokens = (await tokenize(client, keys, {"values": ["123456", "0000000000"], "format": "digits"}))["tokens"]
    assert [len(token) for token in tokens] == [6, 10] and all(token.isdigit() for token in tokens)
    assert (await detokenize(client, keys, {"tokens": tokens}))["values"] == ["123456", "0000000000"]
    for value in ("12345", "12345a", "１２３４５６"):
        status, headers, body = await post(client, keys, "/v1/tokenize", {"values": [value], "format": "digits"},
                                           "tokenizer")
        check_problem(status, headers, body, 422, [value])


async def test_a_card_that_does_not_fit_is_422_without_echo(client: TestClient, keys: KeyRing) -> None:
    for value in ("4111 1111 1111 1112", "4111-1111", "4111 1111 1111 111x"):
        status, headers, body = await post(client, keys, "/v1/tokenize", {"values": [CARD, value], "format": "card"},
                                           "tokenizer")
        problem = check_problem(status, headers, body, 422, [value, value.replace(" ", "")])
        assert "values[1]" in problem["detail"]
    status, headers, body = await post(client, keys, "/v1/tokenize", {"values": ["x"], "format": "cards"},
                                       "tokenizer")
    check_problem(status, headers, body, 400)


async def test_format_tokens_resolve_in_the_asked_epoch(client: TestClient, keys: KeyRing) -> None:
    token_1 = (await tokenize(client, keys, {"values": [CARD], "format": "card"}))["tokens"][0]
    status, _, body = await post(client, keys, "/v1/admin/epochs", {}, "admin")
    assert status == 201 and json.loads(body) == {"epoch": 2}
    token_2 = (await tokenize(client, keys, {"values": [CARD], "format": "card"}))["tokens"][0]
    assert token_2 != token_1
    assert (await detokenize(client, keys, {"tokens": [token_1, token_2]}))["values"] == [None, CARD_DIGITS]
    assert (await detokenize(client, keys, {"tokens": [token_1], "epoch": 1}))["values"] == [CARD_DIGITS]
    assert (await detokenize(client, keys, {"tokens": [token_1], "epoch": 7}))["values"] == [None]
    # Opaque tokens carry their own epoch and ignore the member.
    opaque = (await tokenize(client, keys, {"values": ["alice"]}))["tokens"][0]
    assert (await detokenize(client, keys, {"tokens": [opaque], "epoch": 1}))["values"] == ["alice"]
    for bad in (0, -1, "1", 2**32, True, None):
        status, headers, body = await post(client, keys, "/v1/detokenize", {"tokens": [opaque], "epoch": bad},
                                           "detokenizer")
        check_problem(status, headers, body, 400)


async def test_masked_reveal_never_shows_the_whole_value(client: TestClient, keys: KeyRing) -> None:
    values = [CARD, "alice@example.com", "abc"]
    card_token = (await tokenize(client, keys, {"values": [CARD], "format": "card"}))["tokens"][0]
    opaque = (await tokenize(client, keys, {"values": values}))["tokens"]
    tokens = [card_token, *opaque]
    status, headers, body = await post(client, keys, "/v1/detokenize", {"tokens": tokens}, "masked")
    assert status == 200
    assert json.loads(body) == {"values": ["************1111", "************1111", "*************.com", "**c"]}
    assert CARD_DIGITS not in body.decode() and "alice@example.com" not in body.decode()
    # A key that also holds detokenize sees the values.
    assert (await detokenize(client, keys, {"tokens": tokens}, "both"))["values"] == [CARD_DIGITS, *values]
    status, headers, body = await post(client, keys, "/v1/detokenize", {"tokens": tokens, "include_metadata": True},
                                       "masked")
    check_problem(status, headers, body, 403)
    status, headers, body = await post(client, keys, "/v1/detokenize", {"tokens": tokens}, "tokenizer")
    check_problem(status, headers, body, 403)


async def test_metadata_is_returned_only_when_asked(client: TestClient, keys: KeyRing, node: RunningNode) -> None:
    metadata = {"owner": "team-a", "tier": 2, "tags": ["x", "y"]}
    tokens = (await tokenize(client, keys, {"values": ["v1", "v2"], "metadata": metadata}))["tokens"]
    plain = (await tokenize(client, keys, {"values": ["v3"]}))["tokens"]
    assert await detokenize(client, keys, {"tokens": tokens + plain}) == {"values": ["v1", "v2", "v3"]}
    answer = await detokenize(client, keys, {"tokens": tokens + plain, "include_metadata": True})
    assert answer == {"values": ["v1", "v2", "v3"], "metadata": [metadata, metadata, None]}
    # Stored encrypted: the store's life row holds no metadata text.
    _, stored = node.node.store.life(tokens[0])
    assert stored is not None and b"team-a" not in stored


async def test_metadata_and_ttl_out_of_bounds_are_refused(client: TestClient, keys: KeyRing) -> None:
    secret = "s" * 1100
    for document, expected in (({"values": ["v"], "metadata": {"k": secret}}, 422),
                               ({"values": ["v"], "metadata": [1]}, 400),
                               ({"values": ["v"], "metadata": None}, 400),
                               ({"values": ["v"], "ttl_seconds": 0}, 422),
                               ({"values": ["v"], "ttl_seconds": 315_360_001}, 422),
                               ({"values": ["v"], "ttl_seconds": "60"}, 400),
                               ({"values": ["v"], "ttl_seconds": 1.5}, 400),
                               ({"values": ["v"], "expires": 5}, 400)):
        status, headers, body = await post(client, keys, "/v1/tokenize", document, "tokenizer")
        check_problem(status, headers, body, expected, [secret])


async def test_an_expired_mapping_reads_null_and_is_purged(client: TestClient, keys: KeyRing,
                                                           node: RunningNode) -> None:
    node.service.expiry_purge_interval_seconds = 0.05
    started = time.time()
    short = (await tokenize(client, keys, {"values": [CARD], "format": "card", "ttl_seconds": 1}))["tokens"][0]
    lasting = (await tokenize(client, keys, {"values": ["kept"], "ttl_seconds": 3600}))["tokens"][0]
    answer = await detokenize(client, keys, {"tokens": [short, lasting]})
    if time.time() - started < 0.9:  # on a very slow machine the second may already be over
        assert answer["values"] == [CARD_DIGITS, "kept"]
    store = node.node.store

    async def read_null() -> bool:
        return (await detokenize(client, keys, {"tokens": [short, lasting]}))["values"] == [None, "kept"]

    deadline = time.monotonic() + 10
    while not await read_null():
        assert time.monotonic() < deadline, "the expired mapping still reads"
    await wait_until(lambda: store.lookup_format(1, [short], now_ms=0) == {}, 10, "the purge of the mapping")
    assert store.next_expiry_ms() is not None  # the hour-long one stays indexed
    # Tokenizing the value again after the purge issues the same token, live again.
    again = (await tokenize(client, keys, {"values": [CARD], "format": "card"}))["tokens"][0]
    assert again == short
    assert (await detokenize(client, keys, {"tokens": [short]}))["values"] == [CARD_DIGITS]


async def test_tokenizing_again_never_shortens_the_life(client: TestClient, keys: KeyRing, node: RunningNode) -> None:
    token = (await tokenize(client, keys, {"values": ["v"], "ttl_seconds": 3600, "metadata": {"n": 1}}))["tokens"][0]
    first_expiry, _ = node.node.store.life(token)
    assert first_expiry is not None
    await tokenize(client, keys, {"values": ["v"], "ttl_seconds": 5, "metadata": {"n": 2}})
    expiry, _ = node.node.store.life(token)
    assert expiry == first_expiry
    answer = await detokenize(client, keys, {"tokens": [token], "include_metadata": True})
    assert answer == {"values": ["v"], "metadata": [{"n": 2}]}
    await tokenize(client, keys, {"values": ["v"], "ttl_seconds": 7200})
    longer, _ = node.node.store.life(token)
    assert longer is not None and longer >= first_expiry + 3_000_000
