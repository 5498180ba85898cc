"""The client side (client library, admin CLI, backup download and restore, dev cluster file) against hostile input.

A node, a file on disk or a backup may hold anything: digits that str.isdigit() accepts but int() refuses,
JSON nested past the parser's stack, integers msgpack cannot pack, a stream longer or shorter than it
announced, a checkpoint row that does not decode. Each is answered with the reader's own clear error (and
the CLI's exit code), never a Python traceback, and nothing is kept.
"""

from __future__ import annotations

import asyncio

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import test_utils, web
from click.testing import CliRunner

from fake_vault_server import FakeVaultServer, Reply, problem
from test_backup import restore_with_cli, store_at_41_3
from test_client import API_KEY as CLIENT_KEY, node_a, node_b  # noqa: F401 (node_a and node_b are fixtures)
from node_support import make_configs
from tokenvault.audit_chain import GENESIS_HASH, ChainBreak, ChainVerifier, chain_hash, record_document
from tokenvault.cli.main import tokenvault
from tokenvault.client.vault import AsyncClient, NoNodeAvailable, ProblemError, ResponseError, ServiceUnavailable
from tokenvault.cli.backup import download_backup
from tokenvault.core.backup import (HEADER_BYTES, HEADER_INDEX, HEADER_NODE, HEADER_ROLE, HEADER_VIEW, BackupError,
                                    BackupRefused, restore_data_dir, verify_backup_file)
from tokenvault.core.snapshots import SnapshotSource, take_checkpoint
from tokenvault.core.store import VaultStore
from tokenvault.core.store_layout import API_KEY as API_KEY_ROW, StoreCorruption
from tokenvault.devcluster.cluster_spec import CLUSTER_FILE_NAME, ClusterError, load_cluster

# Digits str.isdigit() accepts and float()/int() refuse (superscripts are digits, not decimals).
NON_ASCII_DIGITS = ["²", "³⁴"]
# Deeper than json.loads can nest at the default recursion limit: RecursionError, not ValueError.
DEEP_JSON = "[" * 5000


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    for name in ("TOKENVAULT_URL", "TOKENVAULT_API_KEY", "TOKENVAULT_CLUSTER_JSON", "TOKENVAULT_CA_FILE"):
        monkeypatch.delenv(name, raising=False)
    return CliRunner()


Handler = Callable[[web.Request], Any]


@pytest.fixture
async def raw_server() -> AsyncIterator[Callable[[Handler], Any]]:
    """Start an aiohttp server on 127.0.0.1:0 in the test's loop that answers every request with ``handler``;
    returns its base URL."""
    servers: list[test_utils.TestServer] = []

    async def start(handler: Handler) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        server = test_utils.TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return str(server.make_url("")).rstrip("/")

    yield start
    for server in servers:
        await server.close()


def raw_answer(status: int, body: str, headers: dict[str, str] | None = None) -> Handler:
    async def handle(request: web.Request) -> web.Response:
        return web.Response(status=status, text=body, headers=headers, content_type="application/json")
    return handle


# ---------------------------------------------------------------- Retry-After with non-ASCII digits


@pytest.mark.parametrize("retry_after", NON_ASCII_DIGITS)
async def test_a_retry_after_of_non_ascii_digits_is_ignored_and_the_client_fails_over(
        node_a: FakeVaultServer, node_b: FakeVaultServer, retry_after: str) -> None:
    node_a.responders[("POST", "/v1/tokenize")] = lambda request: problem(
        503, "Service Unavailable", "no primary", {"Retry-After": retry_after})
    async with AsyncClient([node_a.url, node_b.url], CLIENT_KEY) as vault:
        result = await vault.tokenize(["v"])
    assert result.tokens == (node_b.token_for("v", 1),)
    assert len(node_a.calls("/v1/tokenize")) == 1


@pytest.mark.parametrize("retry_after", NON_ASCII_DIGITS)
async def test_a_persistent_503_with_non_ascii_retry_after_is_service_unavailable_without_one(
        node_a: FakeVaultServer, retry_after: str) -> None:
    node_a.responders[("POST", "/v1/tokenize")] = lambda request: problem(
        503, "Service Unavailable", "no quorum", {"Retry-After": retry_after})
    async with AsyncClient(node_a.url, CLIENT_KEY, retry_after_cap_seconds=0.05, deadline_seconds=0.2) as vault:
        with pytest.raises(ServiceUnavailable) as caught:
            await vault.tokenize(["v"])
    assert caught.value.detail == "no quorum" and caught.value.retry_after_seconds is None


def test_admin_backup_from_a_busy_node_with_non_ascii_retry_after_exits_3(
        runner: CliRunner, node_a: FakeVaultServer, tmp_path: Path) -> None:
    node_a.responders[("GET", "/v1/admin/backup")] = lambda request: problem(
        503, "Service Unavailable", "busy", {"Retry-After": "²"})
    out = tmp_path / "vault.backup"
    result = runner.invoke(tokenvault, ["admin", "backup", "--url", node_a.url, "--api-key", CLIENT_KEY,
                                        "--out", str(out), "--prefer", "any", "--retry-seconds", "0"])
    assert result.exit_code == 3, result.output
    assert "no node available" in result.output and "503 Service Unavailable" in result.output
    assert "Traceback" not in result.output and CLIENT_KEY not in result.output
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- problem text that would drive a terminal

# An escape sequence that clears the screen, a bell, a line break that forges a line of the CLI's own, a
# carriage return that overwrites one, and a right-to-left override that reorders what follows.
HOSTILE_TEXT = "\x1b[2J\x07fine\nerror: none\rok\u202egnorw"


async def test_a_problems_title_and_detail_keep_no_character_that_drives_a_terminal(raw_server: Any) -> None:
    """A node's problem+json title and detail went into the error's fields and message as they came, and
    the CLI prints that message: escape sequences, bells, line breaks and bidirectional overrides reached
    the operator's terminal and logs (checked on the code before). Each such character is a '?' now."""
    body = json.dumps({"type": "about:blank", "title": HOSTILE_TEXT, "status": 400, "detail": HOSTILE_TEXT})
    url = await raw_server(raw_answer(400, body))
    async with AsyncClient(url, CLIENT_KEY, deadline_seconds=0.5) as vault:
        with pytest.raises(ProblemError) as refused:
            await vault.tokenize(["v"])
    for text in (refused.value.title, refused.value.detail, str(refused.value)):
        assert text.isprintable(), repr(text)
    assert refused.value.detail == "?[2J?fine?error: none?ok?gnorw"
    # A 503's title, which the failures of NoNodeAvailable quote, is the same text.
    url = await raw_server(raw_answer(503, json.dumps({"title": HOSTILE_TEXT, "effect": "none"})))
    async with AsyncClient(url, CLIENT_KEY, deadline_seconds=0) as vault:
        with pytest.raises(ServiceUnavailable) as unavailable:
            await vault.tokenize(["v"])
    assert str(unavailable.value).isprintable() and unavailable.value.title.startswith("?[2J?fine")


async def test_a_backup_refusals_title_and_detail_keep_no_character_that_drives_a_terminal(
        raw_server: Any, tmp_path: Path) -> None:
    """The backup download reads a refusal itself, and kept its title and detail as they came (checked on
    the code before)."""
    body = json.dumps({"type": HOSTILE_TEXT, "title": HOSTILE_TEXT, "status": 403, "detail": HOSTILE_TEXT})
    url = await raw_server(raw_answer(403, body))
    with pytest.raises(ProblemError) as refused:
        await download_backup([url], CLIENT_KEY, tmp_path / "vault.backup", prefer="any", retry_seconds=0)
    for text in (refused.value.title, refused.value.detail, refused.value.problem_type, str(refused.value)):
        assert text.isprintable(), repr(text)
    busy = await raw_server(raw_answer(503, json.dumps({"title": HOSTILE_TEXT}), {"Retry-After": "1"}))
    with pytest.raises(NoNodeAvailable) as unavailable:
        await download_backup([busy], CLIENT_KEY, tmp_path / "vault.backup", prefer="any", retry_seconds=0)
    assert str(unavailable.value).isprintable(), repr(str(unavailable.value))
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- JSON nested past the parser's stack


async def test_a_response_nested_past_the_parsers_stack_is_a_response_error(raw_server: Any) -> None:
    url = await raw_server(raw_answer(200, DEEP_JSON))
    async with AsyncClient(url, CLIENT_KEY) as vault:
        with pytest.raises(ResponseError, match="not a JSON object"):
            await vault.cluster()


async def test_a_backup_refusal_nested_past_the_parsers_stack_is_the_status_alone(
        raw_server: Any, tmp_path: Path) -> None:
    url = await raw_server(raw_answer(403, DEEP_JSON))
    with pytest.raises(ProblemError) as caught:
        await download_backup([url], CLIENT_KEY, tmp_path / "vault.backup", prefer="any", retry_seconds=0)
    assert caught.value.status == 403 and caught.value.title == "HTTP 403"
    assert list(tmp_path.iterdir()) == []


def test_a_cluster_json_nested_past_the_parsers_stack_is_a_usage_error(runner: CliRunner, tmp_path: Path) -> None:
    cluster_file = tmp_path / "cluster.json"
    cluster_file.write_text(DEEP_JSON)
    result = runner.invoke(tokenvault, ["admin", "epoch", "list", "--cluster-json", str(cluster_file)])
    assert result.exit_code == 2, result.output
    assert "is not valid JSON" in result.output and "Traceback" not in result.output


def test_a_migration_state_file_nested_past_the_parsers_stack_is_refused(
        runner: CliRunner, node_a: FakeVaultServer, tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    state.write_text("[" * 4000)  # within the state file's 4 KiB bound
    result = runner.invoke(tokenvault, ["admin", "epoch", "migrate", "1", "--state-file", str(state),
                                        "--url", node_a.url, "--api-key", CLIENT_KEY])
    assert result.exit_code == 2, result.output
    assert "is not a migration state of epoch 1" in result.output and "Traceback" not in result.output
    assert node_a.calls("/v1/retokenize") == []


def test_a_dev_cluster_file_nested_past_the_parsers_stack_is_a_cluster_error(tmp_path: Path) -> None:
    (tmp_path / CLUSTER_FILE_NAME).write_text(DEEP_JSON)
    with pytest.raises(ClusterError, match="not in the expected shape"):
        load_cluster(tmp_path)


# ---------------------------------------------------------------- cluster.json's api_keys


@pytest.mark.parametrize("api_keys", [["admin"], "admin", 7, None], ids=["list", "string", "number", "null"])
def test_a_cluster_json_whose_api_keys_is_not_an_object_is_a_usage_error(
        runner: CliRunner, node_a: FakeVaultServer, tmp_path: Path, api_keys: Any) -> None:
    cluster_file = tmp_path / "cluster.json"
    cluster_file.write_text(json.dumps({"nodes": [{"id": "n1", "http_url": node_a.url}], "api_keys": api_keys}))
    result = runner.invoke(tokenvault, ["admin", "epoch", "list", "--cluster-json", str(cluster_file)])
    assert result.exit_code == 2, result.output
    assert "'api_keys' that is not an object" in result.output and "Traceback" not in result.output
    assert node_a.calls("/v1/admin/epochs") == []


# ---------------------------------------------------------------- audit records msgpack cannot pack


def audit_records(count: int) -> list[dict[str, Any]]:
    records, previous = [], GENESIS_HASH
    for seq in range(1, count + 1):
        fields = [1_000 + seq, "n1", "auditor", None, "detokenize", 1, 1, f"req{seq}", None]
        digest = chain_hash(previous, seq, fields)
        records.append(record_document(seq, fields, previous, digest))
        previous = digest
    return records


def nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("field, value", [("items", 2**64), ("at_ms", -2**63 - 1), ("subject", "\ud800"),
                                          ("subject", nested(2000))],
                         ids=["past-u64", "past-i64", "lone-surrogate", "too-deep"])
def test_a_record_msgpack_cannot_pack_is_a_chain_break_at_that_record(field: str, value: Any) -> None:
    records = audit_records(3)
    records[1][field] = value
    verifier = ChainVerifier()
    verifier.check(records[0])
    with pytest.raises(ChainBreak) as caught:
        verifier.check(records[1])
    assert (caught.value.seq, caught.value.reason) == (2, "holds a value out of range")
    assert verifier.count == 1


def test_a_record_with_a_member_the_chain_does_not_hash_is_a_chain_break_at_that_record() -> None:
    """Only RECORD_FIELDS are hashed: a record carrying anything more is not the record the chain holds."""
    records = audit_records(3)
    records[1]["note"] = "added after the record was written"
    verifier = ChainVerifier()
    verifier.check(records[0])
    with pytest.raises(ChainBreak) as caught:
        verifier.check(records[1])
    assert (caught.value.seq, caught.value.reason) == (2, "holds members the chain does not hash")
    assert verifier.count == 1


@pytest.mark.parametrize("member, rewrite", [
    ("hash", str.upper), ("prev_hash", str.upper), ("hash", lambda text: text[:32] + " " + text[32:]),
    ("prev_hash", lambda text: text + "\n"), ("hash", lambda text: " " + text)],
    ids=["uppercase-hash", "uppercase-prev-hash", "space-inside", "newline-after", "space-before"])
def test_a_hash_not_in_the_form_a_node_writes_is_a_chain_break_at_that_record(
        member: str, rewrite: Callable[[str], str]) -> None:
    """bytes.fromhex would read each of these as the same 32 bytes; a node writes 64 lowercase hex digits."""
    records = audit_records(3)
    records[1][member] = rewrite(records[1][member])
    verifier = ChainVerifier()
    verifier.check(records[0])
    with pytest.raises(ChainBreak) as caught:
        verifier.check(records[1])
    assert (caught.value.seq, caught.value.reason) == (2, "lacks a field or has a malformed hash")
    assert verifier.count == 1


@pytest.mark.parametrize("command", ["verify", "export"])
def test_audit_verify_and_export_report_a_record_with_an_unhashed_member_as_broken_with_exit_4(
        runner: CliRunner, node_a: FakeVaultServer, tmp_path: Path, command: str) -> None:
    check_record_12_breaks_the_trail(runner, node_a, tmp_path, command, "note", "not hashed",
                                     "holds members the chain does not hash")


def check_record_12_breaks_the_trail(runner: CliRunner, node_a: FakeVaultServer, tmp_path: Path, command: str,
                                     member: str, value: Any, reason: str) -> None:
    """``audit verify`` or ``audit export`` of 20 records whose 12th has ``member`` set to ``value``: exit 4,
    broken at record 12 for ``reason``, and an export keeps the 11 records before it."""
    records = audit_records(20)
    records[11][member] = value
    node_a.responders[("GET", "/v1/admin/audit")] = lambda request: Reply(
        200, {"records": records, "last_seq": 20, "next_after": None, "anchor": None})
    out = tmp_path / "audit.jsonl"
    extra = ["--out", str(out)] if command == "export" else []
    result = runner.invoke(tokenvault, ["admin", "audit", command, *extra, "--url", node_a.url,
                                        "--api-key", CLIENT_KEY])
    assert result.exit_code == 4, result.output
    assert f"audit trail BROKEN at record 12: {reason} (11 records before it verified)" in result.stderr
    assert "Traceback" not in result.output
    if command == "export":
        assert [json.loads(line)["seq"] for line in out.read_text().splitlines()] == list(range(1, 12))


def test_audit_verify_reports_an_anchor_hash_in_uppercase_as_broken_with_exit_4(
        runner: CliRunner, node_a: FakeVaultServer) -> None:
    """The anchor is the hash of the last record trimmed, named as a node names every hash."""
    records = audit_records(5)
    node_a.responders[("GET", "/v1/admin/audit")] = lambda request: Reply(
        200, {"records": records[2:], "last_seq": 5, "next_after": None,
              "anchor": {"seq": 2, "hash": records[1]["hash"].upper()}})
    result = runner.invoke(tokenvault, ["admin", "audit", "verify", "--url", node_a.url, "--api-key", CLIENT_KEY])
    assert result.exit_code == 4, result.output
    assert "audit trail BROKEN at record 3: the trail's anchor hash is malformed" in result.stderr


@pytest.mark.parametrize("command", ["verify", "export"])
@pytest.mark.parametrize("value", [2**64, "\ud800"], ids=["past-u64", "lone-surrogate"])
def test_audit_verify_and_export_report_a_record_out_of_range_as_broken_with_exit_4(
        runner: CliRunner, node_a: FakeVaultServer, tmp_path: Path, command: str, value: Any) -> None:
    check_record_12_breaks_the_trail(runner, node_a, tmp_path, command, "found", value,
                                     "holds a value out of range")


# ---------------------------------------------------------------- the backup download


def write_store_backup(directory: Path, bad_api_key_row: bytes | None = None) -> bytes:
    """The bytes of a backup of a real store at (41, 3), taken as a node takes one; with ``bad_api_key_row``,
    its checkpoint also holds one API-key row of that (malformed) value."""
    store = store_at_41_3(directory / "store")
    try:
        if bad_api_key_row is not None:
            store._db[API_KEY_ROW + b"k_bad"] = bad_api_key_row
        source = SnapshotSource.from_checkpoint(*take_checkpoint(store, directory / "work"), None)
        path = directory / "store.backup"
        try:
            with open(path, "wb") as handle:
                source.write_to(handle)
        finally:
            source.close()
    finally:
        store.close()
    return path.read_bytes()


@pytest.fixture(scope="module")
def good_backup(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return write_store_backup(tmp_path_factory.mktemp("good-backup"))


def backup_handler(data: bytes, headers: dict[str, str]) -> Handler:
    """Stream ``data`` chunked under the given backup headers, as a node does (whatever they announce)."""
    async def handle(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/octet-stream", **headers})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, len(data), 65536):
            await response.write(data[start:start + 65536])
        await response.write_eof()
        return response
    return handle


def backup_headers(announced_bytes: int) -> dict[str, str]:
    return {HEADER_INDEX: "41", HEADER_VIEW: "3", HEADER_BYTES: str(announced_bytes), HEADER_NODE: "n1",
            HEADER_ROLE: "primary"}


async def test_a_valid_stream_that_matches_its_announced_size_is_kept(
        raw_server: Any, good_backup: bytes, tmp_path: Path) -> None:
    url = await raw_server(backup_handler(good_backup, backup_headers(len(good_backup))))
    out = tmp_path / "vault.backup"
    result = await download_backup([url], CLIENT_KEY, out, prefer="any", retry_seconds=0)
    assert (result.index, result.view, result.size_bytes) == (41, 3, len(good_backup))
    assert out.read_bytes() == good_backup and verify_backup_file(out).index == 41


async def test_the_nodes_name_and_role_are_reported_with_no_character_that_drives_a_terminal(
        good_backup: bytes, tmp_path: Path) -> None:
    """The progress line showed the node's own X- headers as they came, and an HTTP client takes an escape
    sequence in a header value: it reached the terminal (checked on the code before). A raw server, since
    aiohttp's own refuses to send such a header."""
    headers = backup_headers(len(good_backup))
    headers[HEADER_NODE], headers[HEADER_ROLE] = "n1\x1b[2J", "primary\x07\x1b]0;title\x07"

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        writer.write(f"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n{head}Content-Length: "
                     f"{len(good_backup)}\r\nConnection: close\r\n\r\n".encode("latin-1") + good_backup)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    lines: list[str] = []
    try:
        await download_backup([f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"], CLIENT_KEY,
                              tmp_path / "vault.backup", prefer="any", retry_seconds=0, report=lines.append)
    finally:
        server.close()
        await server.wait_closed()
    streaming = next(line for line in lines if line.startswith("streaming the backup of"))
    assert "\x1b" not in streaming and "\x07" not in streaming
    assert "n1?[2J (primary??]0;title?)" in streaming


@pytest.mark.parametrize("difference, reason", [(-1, "goes on past the"), (-1000, "goes on past the"),
                                                (1, "ended after"), (1000, "ended after")],
                         ids=["one-more", "many-more", "one-fewer", "many-fewer"])
async def test_a_stream_longer_or_shorter_than_it_announced_is_refused_and_nothing_is_kept(
        raw_server: Any, good_backup: bytes, tmp_path: Path, difference: int, reason: str) -> None:
    # A whole, valid backup: only the byte count the node announced disagrees with it.
    announced = len(good_backup) + difference
    url = await raw_server(backup_handler(good_backup, backup_headers(announced)))
    out = tmp_path / "vault.backup"
    with pytest.raises(BackupError) as caught:
        await download_backup([url], CLIENT_KEY, out, prefer="any", retry_seconds=0)
    assert reason in str(caught.value) and f"{announced} bytes its {HEADER_BYTES} header announced" \
        in str(caught.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("header", [HEADER_INDEX, HEADER_VIEW, HEADER_BYTES])
@pytest.mark.parametrize("value", ["²", "-1", "1" * 21, ""], ids=["superscript", "negative", "21-digits", "empty"])
async def test_a_backup_header_that_is_not_a_short_ascii_number_is_a_backup_error(
        raw_server: Any, good_backup: bytes, tmp_path: Path, header: str, value: str) -> None:
    headers = backup_headers(len(good_backup))
    headers[header] = value
    url = await raw_server(backup_handler(good_backup, headers))
    with pytest.raises(BackupError, match=f"lacks a valid {header} header"):
        await download_backup([url], CLIENT_KEY, tmp_path / "vault.backup", prefer="any", retry_seconds=0)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- restoring a checkpoint the store cannot load


def test_a_backup_whose_checkpoint_holds_a_malformed_api_key_row_is_refused_by_restore(
        runner: CliRunner, tmp_path: Path) -> None:
    (tmp_path / "source").mkdir()
    backup = tmp_path / "bad-row.backup"
    backup.write_bytes(write_store_backup(tmp_path / "source", b"\xc1 not msgpack"))
    config = make_configs(tmp_path / "restored", 1)[0]
    with pytest.raises(BackupRefused, match="an API key record is malformed"):
        restore_data_dir(backup, config)
    result = restore_with_cli(runner, backup, config, tmp_path)
    assert result.exit_code == 1, result.output
    assert "an API key record is malformed" in result.output and "Traceback" not in result.output
    assert not config.data_dir.exists()
    assert [path.name for path in config.data_dir.parent.iterdir()] == []


def test_a_store_error_while_the_checkpoint_is_made_live_is_a_refusal_and_writes_nothing(
        tmp_path: Path, good_backup: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    # A checkpoint whose state the store cannot load once installed (one that escaped the verification):
    # commit_install raises the store's own error, which restore reports like any other refusal.
    def refuse(self: VaultStore, prepared: Any) -> Any:
        raise StoreCorruption("the audit head record is malformed")

    monkeypatch.setattr(VaultStore, "commit_install", refuse)
    backup = tmp_path / "good.backup"
    backup.write_bytes(good_backup)
    config = make_configs(tmp_path / "restored", 1)[0]
    with pytest.raises(BackupRefused, match="the backup's checkpoint is refused: the audit head record is malformed"):
        restore_data_dir(backup, config)
    assert not config.data_dir.exists()
    assert [path.name for path in config.data_dir.parent.iterdir()] == []
