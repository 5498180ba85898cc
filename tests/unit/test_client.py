"""Tests of tokenvault.client.vault against in-memory fake nodes on 127.0.0.1:0."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from fake_vault_server import DROP, FakeVaultServer, Reply, closed_port_url, node_tls_files, problem
from tokenvault.client import vault as client_module
from tokenvault.client.vault import (AsyncClient, Client, ConfigurationError, Conflict, Forbidden,
                                     MembershipChangeFailed, NoNodeAvailable, NotFound, OutcomeUnknown, ProblemError,
                                     RateLimited, RequestTimeout, ResponseError, ServerError, ServiceUnavailable,
                                     Unauthorized, normalize_urls)

API_KEY = "tvk_" + "A" * 43


@pytest.fixture
def node_a() -> Iterator[FakeVaultServer]:
    with FakeVaultServer("n1", api_key=API_KEY) as server:
        yield server


@pytest.fixture
def node_b() -> Iterator[FakeVaultServer]:
    with FakeVaultServer("n2", role="backup", api_key=API_KEY) as server:
        yield server


def test_normalize_urls_splits_commas_strips_slashes_and_deduplicates() -> None:
    urls = normalize_urls(["http://127.0.0.1:8101/, http://127.0.0.1:8102", "http://127.0.0.1:8101"])
    assert urls == ("http://127.0.0.1:8101", "http://127.0.0.1:8102")


@pytest.mark.parametrize("bad", ["", "127.0.0.1:8101", "ftp://host", "http://", "http://h/?q=1"])
def test_normalize_urls_rejects_unusable_urls(bad: str) -> None:
    with pytest.raises(ConfigurationError):
        normalize_urls(bad)


def test_a_url_with_a_user_name_or_password_is_refused_without_showing_it() -> None:
    """Accepted before, it was repeated in every message naming the URL, password and all."""
    for url in ("http://ops:s3cret-pw@127.0.0.1:8101", "https://ops@127.0.0.1:8101"):
        with pytest.raises(ConfigurationError) as caught:
            normalize_urls(url)
        assert "user name or password" in str(caught.value) and "s3cret" not in str(caught.value)
        assert "ops" not in str(caught.value)


async def test_no_try_starts_past_the_deadline_but_the_first() -> None:
    """Three nodes that take a connection and never answer: a round of URLs waited each out to its timeout,
    so a call with a deadline of 0.1 s and a timeout of 0.5 s tried all three (checked on the code before:
    three connections). It now tries one, and ends within the deadline and that try's timeout."""
    connections = 0
    silent: list[asyncio.StreamWriter] = []

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        silent.append(writer)

    servers = [await asyncio.start_server(never_answer, "127.0.0.1", 0) for _ in range(3)]
    urls = [f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}" for server in servers]
    try:
        async with AsyncClient(urls, API_KEY, deadline_seconds=0.1, timeout_seconds=0.5) as vault:
            with pytest.raises(NoNodeAvailable):
                await vault.tokenize(["v"])
        assert connections == 1
    finally:
        for writer in silent:
            writer.close()
        for server in servers:
            server.close()
            await server.wait_closed()


async def test_the_page_cursor_is_sent_as_one_query_value(node_a: FakeVaultServer) -> None:
    """The cursor went into the query as it was: one holding '&' or '#' would have split it (checked on
    the code before: the node saw the cursor cut at the '&' and a second limit)."""
    node_a.responders[("GET", "/v1/admin/epochs/1/tokens")] = lambda request: Reply(
        200, {"epoch": 1, "state": "retired", "tokens": [], "next_after": None})
    cursor = "tv1_a&limit=5#x"
    async with AsyncClient(node_a.url, API_KEY) as vault:
        await vault.epoch_tokens(1, after=cursor, limit=10)
    (call,) = node_a.calls("/v1/admin/epochs/1/tokens")
    assert call.query == {"limit": "10", "after": cursor}


def test_api_key_with_header_breaking_characters_is_refused_without_echo() -> None:
    with pytest.raises(ConfigurationError) as caught:
        AsyncClient("http://127.0.0.1:1", "secret\r\nInjected: 1")
    assert "secret" not in str(caught.value)


async def test_text_that_is_not_utf8_is_a_configuration_error_naming_nothing_and_nothing_is_sent(
        node_a: FakeVaultServer) -> None:
    """Python reads bytes that are not UTF-8 as lone surrogates: encoding the body raised UnicodeEncodeError,
    whose object is the whole body, values included (checked on the code before)."""
    async with AsyncClient(node_a.url, API_KEY) as vault:
        with pytest.raises(ConfigurationError, match="not valid UTF-8") as caught:
            await vault.tokenize(["4111 1111 1111 1111", "secret-\udcff\udcfe"])
        with pytest.raises(ConfigurationError, match="not valid UTF-8"):
            await vault.detokenize(["tv1_\udcff"])
    assert "4111" not in str(caught.value) and "secret" not in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert node_a.calls("/v1/tokenize") == [] and node_a.calls("/v1/detokenize") == []


async def test_tokenize_sends_bearer_key_and_json_and_parses_result(node_a: FakeVaultServer) -> None:
    async with AsyncClient(node_a.url, API_KEY) as vault:
        result = await vault.tokenize(["4111", "5500"], idempotency_key="k-1")
    assert result.epoch == 1
    assert result.tokens == (node_a.token_for("4111", 1), node_a.token_for("5500", 1))
    assert result.replayed is False
    sent = node_a.calls("/v1/tokenize")[0]
    assert sent.headers["Authorization"] == f"Bearer {API_KEY}"
    assert sent.headers["Idempotency-Key"] == "k-1"
    assert sent.headers["Content-Type"].startswith("application/json")
    assert sent.body == {"values": ["4111", "5500"]}


async def test_replayed_header_is_reported(node_a: FakeVaultServer) -> None:
    node_a.responders[("POST", "/v1/tokenize")] = lambda request: Reply(
        200, {"epoch": 1, "tokens": ["tv1_" + "a" * 32]}, {"Idempotent-Replayed": "true"})
    async with AsyncClient(node_a.url, API_KEY) as vault:
        result = await vault.tokenize(["x"], idempotency_key="k")
    assert result.replayed is True


async def test_fails_over_from_an_unreachable_node_and_remembers_the_live_one(node_b: FakeVaultServer) -> None:
    async with AsyncClient([closed_port_url(), node_b.url], API_KEY, deadline_seconds=2) as vault:
        tokens = (await vault.tokenize(["v"])).tokens
        assert vault.current_url == node_b.url
        assert await vault.detokenize(tokens) == ("v",)
    assert len(node_b.calls("/v1/tokenize")) == 1


async def test_fails_over_on_503(node_a: FakeVaultServer, node_b: FakeVaultServer) -> None:
    node_a.responders[("POST", "/v1/tokenize")] = lambda request: problem(
        503, "Service Unavailable", "no primary", {"Retry-After": "1"})
    async with AsyncClient([node_a.url, node_b.url], API_KEY) as vault:
        result = await vault.tokenize(["v"])
    assert result.tokens == (node_b.token_for("v", 1),)
    assert len(node_a.calls("/v1/tokenize")) == 1


async def test_retries_the_same_node_after_retry_after_until_it_recovers(node_a: FakeVaultServer) -> None:
    answers = iter([problem(503, "Service Unavailable", "electing", {"Retry-After": "5"})] * 2)
    node_a.responders[("POST", "/v1/tokenize")] = lambda request: next(answers, None)
    async with AsyncClient(node_a.url, API_KEY, retry_after_cap_seconds=0.05, deadline_seconds=5) as vault:
        result = await vault.tokenize(["v"])
    assert result.epoch == 1
    assert len(node_a.calls("/v1/tokenize")) == 3


async def test_persistent_503_raises_service_unavailable_with_capped_retry_after(node_a: FakeVaultServer) -> None:
    node_a.responders[("POST", "/v1/tokenize")] = lambda request: problem(
        503, "Service Unavailable", "no quorum", {"Retry-After": "30"})
    async with AsyncClient(node_a.url, API_KEY, retry_after_cap_seconds=0.05, deadline_seconds=0.3) as vault:
        with pytest.raises(ServiceUnavailable) as caught:
            await vault.tokenize(["v"])
    assert caught.value.status == 503
    assert caught.value.detail == "no quorum"
    assert caught.value.retry_after_seconds == 0.05
    assert len(node_a.calls("/v1/tokenize")) >= 2


async def test_no_reachable_node_raises_no_node_available() -> None:
    urls = [closed_port_url(), closed_port_url()]
    async with AsyncClient(urls, API_KEY, deadline_seconds=0.3, retry_after_cap_seconds=0.05) as vault:
        with pytest.raises(NoNodeAvailable) as caught:
            await vault.health()
    assert caught.value.failures
    assert API_KEY not in str(caught.value)


async def test_no_node_available_names_each_failure_once_with_how_often_it_came() -> None:
    """Retried until the deadline, one unreachable URL fails the same way on every round: the message
    says so once, with the count, where it repeated the same text for every round."""
    url = closed_port_url()
    async with AsyncClient([url], API_KEY, deadline_seconds=0.5, retry_after_cap_seconds=0.05) as vault:
        with pytest.raises(NoNodeAvailable) as caught:
            await vault.health()
    rounds = len(caught.value.failures)
    assert rounds >= 3
    message = str(caught.value)
    assert message.count(url) == 1, message
    assert message.endswith(f" ({rounds} times)"), message
    assert str(NoNodeAvailable(["a: refused", "b: timed out", "a: refused"])) == \
        "no node available: a: refused (2 times); b: timed out"
    assert str(NoNodeAvailable([])) == "no node available: no attempt made"


async def test_an_https_node_not_listening_is_named_by_its_address_not_by_the_clients_tls_context(
        tmp_path: Path) -> None:
    """With a ca_file every request carries the client's TLS context, and aiohttp's words for a refused
    connection named it as Python shows an object ('ssl:<ssl.SSLContext object at 0x7f...>'): what the CLI
    printed for the commonest mistake, a cluster not started. The message names the host and port and why."""
    url = closed_port_url().replace("http://", "https://")
    address = url.removeprefix("https://")
    files = node_tls_files(tmp_path / "tls")
    async with AsyncClient([url], API_KEY, deadline_seconds=0.3, retry_after_cap_seconds=0.05,
                           ca_file=files.ca_file) as vault:
        with pytest.raises(NoNodeAvailable) as caught:
            await vault.health()
    message = str(caught.value)
    assert "object at 0x" not in message and "SSLContext" not in message, message
    assert f"ClientConnectorError: Cannot connect to host {address} [Connect call failed" in message, message


async def test_an_http_url_of_an_https_node_fails_with_a_hint_to_try_https(tmp_path: Path) -> None:
    """An http:// URL of a node that serves TLS failed with only "ServerDisconnectedError: Server
    disconnected (N times)" (checked on the code before). The failure now asks whether the node serves
    HTTPS and names the https:// URL to try; the retries are as before."""
    files = node_tls_files(tmp_path / "tls")
    with FakeVaultServer("n1", tls_files=files, api_key=API_KEY) as node:
        url = node.url.replace("https://", "http://")
        hint = f"(is the node serving HTTPS? try {node.url})"
        async with AsyncClient(url, API_KEY, deadline_seconds=0.3, retry_after_cap_seconds=0.05) as vault:
            with pytest.raises(NoNodeAvailable) as caught:
                await vault.list_epochs()
            assert f"{url}: ServerDisconnectedError: Server disconnected {hint}" in str(caught.value)
            with pytest.raises(NoNodeAvailable, match=re.escape(hint)):
                await vault.health(url)
            with pytest.raises(OutcomeUnknown, match=re.escape(hint)):
                await vault.create_key("ci", ["tokenize"])
    assert node.requests == []


async def test_an_https_url_of_a_plain_http_node_fails_with_a_hint_to_try_http(node_a: FakeVaultServer,
                                                                              tmp_path: Path) -> None:
    """The reverse: an https:// URL of a node serving plain HTTP failed with only the TLS library's
    "[SSL: WRONG_VERSION_NUMBER] wrong version number" (checked on the code before); the failure now asks
    whether the node serves plain HTTP and names the http:// URL to try."""
    url = node_a.url.replace("http://", "https://")
    hint = f"(is the node serving plain HTTP? try {node_a.url})"
    files = node_tls_files(tmp_path / "tls")
    async with AsyncClient(url, API_KEY, deadline_seconds=0.3, retry_after_cap_seconds=0.05,
                           ca_file=files.ca_file) as vault:
        with pytest.raises(NoNodeAvailable, match=re.escape(hint)):
            await vault.list_epochs()
        with pytest.raises(NoNodeAvailable, match=re.escape(hint)):
            await vault.health(url)
    assert node_a.calls("/v1/admin/epochs") == []


def test_a_connection_failure_of_the_url_s_own_scheme_has_no_scheme_hint() -> None:
    """A node that is not listening is not a scheme mistake: no hint (the hint is for the two failures a
    wrong scheme gives)."""
    with Client(closed_port_url(), API_KEY, deadline_seconds=0.2, retry_after_cap_seconds=0.05) as vault:
        with pytest.raises(NoNodeAvailable) as caught:
            vault.list_epochs()
    assert "try http" not in str(caught.value) and "serving" not in str(caught.value)


async def test_client_errors_are_typed_and_not_retried(node_a: FakeVaultServer, node_b: FakeVaultServer) -> None:
    node_a.responders[("POST", "/v1/admin/epochs")] = lambda request: problem(
        403, "Forbidden", "this key lacks the admin scope")
    async with AsyncClient([node_a.url, node_b.url], API_KEY) as vault:
        with pytest.raises(Forbidden) as caught:
            await vault.rotate_epoch()
    assert caught.value.detail == "this key lacks the admin scope"
    assert caught.value.title == "Forbidden"
    assert node_b.calls("/v1/admin/epochs") == []
    assert API_KEY not in str(caught.value)


@pytest.mark.parametrize(("status", "error_class"), [(429, RateLimited), (408, RequestTimeout), (418, ServerError)])
async def test_a_rate_limit_and_a_request_timeout_have_their_own_class_and_are_not_retried(
        node_a: FakeVaultServer, node_b: FakeVaultServer, status: int, error_class: type[ProblemError]) -> None:
    node_a.responders[("POST", "/v1/tokenize")] = lambda request: problem(
        status, "Refused", "try again later", {"Retry-After": "1"})
    async with AsyncClient([node_a.url, node_b.url], API_KEY) as vault:
        with pytest.raises(ProblemError) as caught:
            await vault.tokenize(["a value"])
    assert type(caught.value) is error_class and caught.value.status == status
    assert caught.value.retry_after_seconds == 1
    assert node_b.calls("/v1/tokenize") == []


async def test_wrong_key_gives_unauthorized(node_a: FakeVaultServer) -> None:
    async with AsyncClient(node_a.url, "tvk_wrong") as vault:
        with pytest.raises(Unauthorized):
            await vault.list_epochs()


async def test_rotate_generates_one_idempotency_key_reused_across_failover(
        node_a: FakeVaultServer, node_b: FakeVaultServer) -> None:
    node_a.responders[("POST", "/v1/admin/epochs")] = lambda request: DROP
    async with AsyncClient([node_a.url, node_b.url], API_KEY) as vault:
        result = await vault.rotate_epoch()
    assert result.epoch == 2
    first_key = node_a.calls("/v1/admin/epochs")[0].headers["Idempotency-Key"]
    second_key = node_b.calls("/v1/admin/epochs")[0].headers["Idempotency-Key"]
    assert first_key == second_key and first_key


async def test_an_empty_idempotency_key_is_sent_as_given_and_not_dropped_or_replaced(node_a: FakeVaultServer) -> None:
    """An empty key is not a missing one: the node answers it 400 (docs/api.md, "Idempotency"). The client
    dropped it from a tokenize (sent without any key) and replaced it by a random one for a rotation."""
    async with AsyncClient(node_a.url, API_KEY) as vault:
        await vault.tokenize(["v"], idempotency_key="")
        await vault.rotate_epoch("")
    assert node_a.calls("/v1/tokenize")[0].headers.get("Idempotency-Key") == ""
    assert node_a.calls("/v1/admin/epochs")[0].headers.get("Idempotency-Key") == ""


async def test_in_flight_409_is_retried_only_after_an_uncertain_attempt(node_a: FakeVaultServer) -> None:
    answers = iter([DROP, problem(409, "Conflict", "in flight")])
    node_a.responders[("POST", "/v1/tokenize")] = lambda request: next(answers, None)
    async with AsyncClient(node_a.url, API_KEY, retry_after_cap_seconds=0.05) as vault:
        result = await vault.tokenize(["v"], idempotency_key="k")
    assert result.tokens == (node_a.token_for("v", 1),)
    assert len(node_a.calls("/v1/tokenize")) == 3


async def test_first_attempt_409_is_raised(node_a: FakeVaultServer) -> None:
    node_a.responders[("POST", "/v1/tokenize")] = lambda request: problem(409, "Conflict", "in flight")
    async with AsyncClient(node_a.url, API_KEY) as vault:
        with pytest.raises(Conflict):
            await vault.tokenize(["v"], idempotency_key="k")
    assert len(node_a.calls("/v1/tokenize")) == 1


async def test_tokenize_response_with_wrong_token_count_is_a_response_error(node_a: FakeVaultServer) -> None:
    node_a.responders[("POST", "/v1/tokenize")] = lambda request: Reply(200, {"epoch": 1, "tokens": []})
    async with AsyncClient(node_a.url, API_KEY) as vault:
        with pytest.raises(ResponseError):
            await vault.tokenize(["v"])


async def test_detokenize_with_metadata_asks_for_it_and_checks_its_shape(node_a: FakeVaultServer) -> None:
    answers = iter([{"values": ["v", None], "metadata": [{"m": 1}, None]},
                    {"values": ["v", None], "metadata": [{"m": 1}]},
                    {"values": ["v", None]}])
    node_a.responders[("POST", "/v1/detokenize")] = lambda request: Reply(200, next(answers))
    async with AsyncClient(node_a.url, API_KEY) as vault:
        found = await vault.detokenize_with_metadata(["tv1_a", "tv1_b"], epoch=3)
        assert (found.values, found.metadata) == (("v", None), ({"m": 1}, None))
        for _ in range(2):  # a metadata list one short, and none at all
            with pytest.raises(ResponseError, match="metadata"):
                await vault.detokenize_with_metadata(["tv1_a", "tv1_b"])
    sent = [request.body for request in node_a.calls("/v1/detokenize")]
    assert sent[0] == {"tokens": ["tv1_a", "tv1_b"], "epoch": 3, "include_metadata": True}


async def test_oversized_response_is_refused(node_a: FakeVaultServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_module, "MAX_RESPONSE_BYTES", 64)
    node_a.responders[("GET", "/v1/admin/cluster")] = lambda request: Reply(200, {"nodes": ["x" * 200]})
    async with AsyncClient(node_a.url, API_KEY) as vault:
        with pytest.raises(ResponseError):
            await vault.cluster()


async def test_health_of_a_given_url_does_not_fail_over(node_b: FakeVaultServer) -> None:
    down = closed_port_url()
    async with AsyncClient([down, node_b.url]) as vault:
        with pytest.raises(NoNodeAvailable):
            await vault.health(down)
        health = await vault.health(node_b.url)
    assert health["node_id"] == "n2"
    assert node_b.calls("/health")


def test_sync_client_round_trip_and_epochs(node_a: FakeVaultServer) -> None:
    with Client(node_a.url, API_KEY) as vault:
        first = vault.tokenize(["4111 1111 1111 1111"])
        assert vault.detokenize(list(first.tokens) + ["tv1_" + "b" * 32]) == ("4111 1111 1111 1111", None)
        assert vault.rotate_epoch().epoch == 2
        epochs = vault.list_epochs()
        assert epochs.active_epoch == 2
        assert [entry.state for entry in epochs.epochs] == ["retired", "active"]
        assert vault.cluster()["nodes"][0]["id"] == "n1"
        assert repr(vault).count(API_KEY) == 0



# ---------------------------------------------------------------- https and the cluster CA


def test_https_nodes_are_verified_against_the_given_ca(tmp_path: Path) -> None:
    files = node_tls_files(tmp_path / "tls")
    with FakeVaultServer("n1", tls_files=files, api_key=API_KEY) as node:
        assert node.url.startswith("https://")
        with Client(node.url, API_KEY, ca_file=files.ca_file) as vault:
            assert vault.health()["node_id"] == "n1"
            assert vault.tokenize(["v"]).epoch == 1
        # Without the cluster CA the node's certificate is not trusted, and nothing is sent to it.
        with Client(node.url, API_KEY, deadline_seconds=0.2) as vault:
            with pytest.raises(NoNodeAvailable, match="certificate verify failed.*not one this client trusts: give"):
                vault.tokenize(["v"])
        other = node_tls_files(tmp_path / "other")
        with Client(node.url, API_KEY, deadline_seconds=0.2, ca_file=other.ca_file) as vault:
            with pytest.raises(NoNodeAvailable):
                vault.tokenize(["v"])
        assert len(node.calls("/v1/tokenize")) == 1


async def test_nodes_whose_certificates_are_not_trusted_fail_at_once_saying_what_to_give(tmp_path: Path) -> None:
    """Every node of a round refused for its certificate: retried until the deadline (the CLI's 10 s) with
    only the TLS library's words (checked on the code before: the call outlived a 20 s limit with a 60 s
    deadline). It fails after that round, naming the cluster CA and how to give it."""
    files = node_tls_files(tmp_path / "tls")
    with FakeVaultServer("n1", tls_files=files, api_key=API_KEY) as one, \
            FakeVaultServer("n2", tls_files=files, api_key=API_KEY) as two:
        async with AsyncClient([one.url, two.url], API_KEY, deadline_seconds=60) as vault:
            with pytest.raises(NoNodeAvailable) as caught:
                await asyncio.wait_for(vault.tokenize(["v"]), 20)  # a deadline on the test, not a timing
    assert str(caught.value).count("give the cluster CA (ca_file; the CLI's --ca-file, or --cluster-json") == 2
    assert one.requests == [] and two.requests == []


async def test_a_session_given_by_the_caller_still_verifies_nodes_against_the_given_ca(tmp_path: Path) -> None:
    """ca_file was used only by the session the client makes itself: with a caller's session it was dropped,
    so a node was verified as that session's connector does, against the system's CAs (the cluster CA's node
    refused), or not at all (a connector with ssl=False: a node no CA given trusts was sent the key and the
    values; both checked on the code before). Every request now carries the context of ca_file."""
    import aiohttp

    files = node_tls_files(tmp_path / "tls")
    other = node_tls_files(tmp_path / "other")
    with FakeVaultServer("n1", tls_files=files, api_key=API_KEY) as node:
        async with aiohttp.ClientSession() as session:
            async with AsyncClient(node.url, API_KEY, ca_file=files.ca_file, session=session) as vault:
                assert (await vault.tokenize(["v"])).epoch == 1
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=False)) as session:
            async with AsyncClient(node.url, API_KEY, ca_file=other.ca_file, session=session,
                                   deadline_seconds=0.2) as vault:
                with pytest.raises(NoNodeAvailable, match="certificate verify failed|SSL"):
                    await vault.tokenize(["v"])
        assert len(node.calls("/v1/tokenize")) == 1


def test_an_unusable_ca_file_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="missing.crt.*does not exist"):
        AsyncClient("https://127.0.0.1:1", API_KEY, ca_file=tmp_path / "missing.crt")
    garbage = tmp_path / "garbage.crt"
    garbage.write_text("not a certificate")
    with pytest.raises(ConfigurationError, match="does not hold PEM certificates"):
        AsyncClient("https://127.0.0.1:1", API_KEY, ca_file=garbage)


# ---------------------------------------------------------------- membership changes


def _members_answer(node_ids: list[str], committed: bool) -> Reply:
    return Reply(200, {"primary_id": "n1", "configuration_index": 7, "committed": committed,
                       "commit_index": 7 if committed else 6,
                       "members": [{"id": node_id, "peer_addr": None, "role": "voter", "match_index": 6}
                                   for node_id in node_ids]})


async def test_a_removal_the_list_shows_uncommitted_is_never_taken_as_done(node_a: FakeVaultServer) -> None:
    # What run_cluster.sh remove-node calls before it stops the node and drops it from cluster.json: the
    # removal of n4 is in effect at index 7, not committed, so it may still be undone by a leader change.
    node_a.responders[("GET", "/v1/admin/members")] = lambda request: _members_answer(["n1", "n2"], False)
    async with AsyncClient(node_a.url, API_KEY) as vault:
        loop = asyncio.get_running_loop()
        with pytest.raises(MembershipChangeFailed, match="not committed"):
            await vault.change_member_once("remove", "n4", None, loop.time() + 1.2)
    assert len(node_a.calls("/v1/admin/members")) >= 2, "it read the list again while it waited"
    assert not node_a.calls("/v1/admin/members/n4/remove"), "a change found in effect is not proposed again"


async def test_a_refused_retry_waits_until_the_list_says_its_change_committed(node_a: FakeVaultServer) -> None:
    # The first try timed out (its outcome unknown) and the retry is refused: n4 is no member any more.
    # That removal is done only once the list also says it is committed.
    polls: list[int] = []

    def members(request: object) -> Reply:
        polls.append(1)
        if len(polls) == 1:
            return _members_answer(["n1", "n2", "n4"], True)
        return _members_answer(["n1", "n2"], committed=len(polls) > 3)

    node_a.responders[("GET", "/v1/admin/members")] = members
    node_a.responders[("POST", "/v1/admin/members/n4/remove")] = lambda request: problem(
        409, "Conflict", "n4 is not a member")
    async with AsyncClient(node_a.url, API_KEY) as vault:
        loop = asyncio.get_running_loop()
        await vault.change_member_once("remove", "n4", None, loop.time() + 10)
    assert len(polls) == 4 and len(node_a.calls("/v1/admin/members/n4/remove")) == 1


async def test_an_in_flight_409_after_a_503_that_may_still_take_effect_is_retried() -> None:
    """The rotate's first try is answered 503 "it may still take effect"; the keyed retry then finds it still
    in flight (409), and a moment later its replay: the 503 left the outcome as unknown as a dropped
    connection does."""
    answers = iter([
        problem(503, "Service Unavailable", "the write was not confirmed by a majority in time; it may still "
                                            "take effect", {"Retry-After": "1"}),
        problem(409, "Conflict", "a request with this Idempotency-Key is still in progress"),
        Reply(201, {"epoch": 2}, {"Idempotent-Replayed": "true"}),
    ])
    with FakeVaultServer("n1", api_key=API_KEY) as node:
        node.responders[("POST", "/v1/admin/epochs")] = lambda request: next(answers)
        async with AsyncClient(node.url, API_KEY, retry_after_cap_seconds=0.05) as vault:
            result = await vault.rotate_epoch()
    assert result.epoch == 2 and result.replayed


_CREATED = {"id": "0123456789abcdef", "name": "ci", "scopes": ["admin"], "created_at": "2026-01-01T00:00:00Z",
            "key": "tvk1_0123456789abcdef_" + "x" * 43}


async def test_a_key_create_whose_connection_drops_is_not_resent_and_says_the_outcome_is_unknown(
        node_a: FakeVaultServer, node_b: FakeVaultServer) -> None:
    node_a.responders[("POST", "/v1/admin/keys")] = lambda request: DROP
    node_b.responders[("POST", "/v1/admin/keys")] = lambda request: Reply(201, _CREATED)
    async with AsyncClient([node_a.url, node_b.url], API_KEY) as vault:
        with pytest.raises(OutcomeUnknown) as caught:
            await vault.create_key("ci", ["admin"])
    assert node_b.calls("/v1/admin/keys") == [] and len(node_a.calls("/v1/admin/keys")) == 1
    assert "unknown" in str(caught.value) and "tokenvault admin key list" in str(caught.value)
    assert API_KEY not in str(caught.value)


async def test_a_key_create_answered_503_may_still_take_effect_is_not_resent(
        node_a: FakeVaultServer, node_b: FakeVaultServer) -> None:
    node_a.responders[("POST", "/v1/admin/keys")] = lambda request: problem(
        503, "Service unavailable", "the write was not confirmed by a majority in time; it may still take effect "
                                    "(once): retry, ideally with an Idempotency-Key", {"Retry-After": "1"})
    node_b.responders[("POST", "/v1/admin/keys")] = lambda request: Reply(201, _CREATED)
    async with AsyncClient([node_a.url, node_b.url], API_KEY) as vault:
        with pytest.raises(OutcomeUnknown, match="may still take effect"):
            await vault.create_key("ci", ["admin"])
    assert node_b.calls("/v1/admin/keys") == []


async def test_a_key_create_moves_on_past_a_refused_connection_and_a_503_that_had_no_effect(
        node_b: FakeVaultServer) -> None:
    with FakeVaultServer("n3", api_key=API_KEY) as busy:
        busy.responders[("POST", "/v1/admin/keys")] = lambda request: Reply(
            503, {"type": "urn:tokenvault:problem:overloaded", "title": "Service unavailable", "status": 503,
                  "detail": "the primary's work queue is full", "effect": "none"}, {"Retry-After": "1"})
        node_b.responders[("POST", "/v1/admin/keys")] = lambda request: Reply(201, _CREATED)
        async with AsyncClient([closed_port_url(), busy.url, node_b.url], API_KEY) as vault:
            info = await vault.create_key("ci", ["admin"])
    assert info.id == "0123456789abcdef" and info.key == _CREATED["key"]
    assert len(node_b.calls("/v1/admin/keys")) == 1


async def test_a_503_is_judged_by_its_effect_member_never_by_the_words_of_its_detail(
        node_a: FakeVaultServer, node_b: FakeVaultServer) -> None:
    """docs/api.md, Errors: "effect": "none" says the request had no effect, whatever the detail says;
    without it (or "unknown"), a key create is not sent again. The client matched detail phrases before
    (a detail that said "had no effect" made it send again)."""
    def unavailable(detail: str, effect: str | None) -> Reply:
        body = {"type": "urn:tokenvault:problem:unavailable", "title": "Service unavailable", "status": 503,
                "detail": detail}
        if effect is not None:
            body["effect"] = effect
        return Reply(503, body, {"Retry-After": "1"})

    node_b.responders[("POST", "/v1/admin/keys")] = lambda request: Reply(201, _CREATED)
    for detail, effect in (("it had no effect", "unknown"), ("no primary is known right now", None),
                           ("it had no effect", "maybe")):
        node_a.responders[("POST", "/v1/admin/keys")] = lambda request: unavailable(detail, effect)
        async with AsyncClient([node_a.url, node_b.url], API_KEY, retry_after_cap_seconds=0.05) as vault:
            with pytest.raises(OutcomeUnknown):
                await vault.create_key("ci", ["admin"])
        assert node_b.calls("/v1/admin/keys") == [], (detail, effect)
    node_a.responders[("POST", "/v1/admin/keys")] = lambda request: unavailable("in a few words", "none")
    async with AsyncClient([node_a.url, node_b.url], API_KEY, retry_after_cap_seconds=0.05) as vault:
        assert (await vault.create_key("ci", ["admin"])).id == _CREATED["id"]
    assert len(node_b.calls("/v1/admin/keys")) == 1


async def test_a_revoke_retried_after_a_lost_answer_that_finds_no_key_is_done(
        node_a: FakeVaultServer, node_b: FakeVaultServer) -> None:
    path = "/v1/admin/keys/0123456789abcdef/revoke"
    node_a.responders[("POST", path)] = lambda request: DROP
    node_b.responders[("POST", path)] = lambda request: problem(404, "Not Found", "no runtime API key has this id")
    async with AsyncClient([node_a.url, node_b.url], API_KEY) as vault:
        result = await vault.revoke_key("0123456789abcdef")
    assert result.id == "0123456789abcdef" and result.already_gone
    assert len(node_b.calls(path)) == 1


async def test_a_revoke_of_a_missing_key_at_the_first_try_is_still_not_found(node_a: FakeVaultServer) -> None:
    path = "/v1/admin/keys/0123456789abcdef/revoke"
    node_a.responders[("POST", path)] = lambda request: problem(404, "Not Found", "no runtime API key has this id")
    async with AsyncClient(node_a.url, API_KEY) as vault:
        with pytest.raises(NotFound):
            await vault.revoke_key("0123456789abcdef")
    node_a.responders[("POST", path)] = lambda request: Reply(200, {"id": "0123456789abcdef", "revoked": True})
    async with AsyncClient(node_a.url, API_KEY) as vault:
        assert not (await vault.revoke_key("0123456789abcdef")).already_gone
