"""`tokenvault admin audit verify` and `audit export` walking the pages a real node serves:
NodeService.audit_page over a real VaultStore behind a FakeVaultServer, so the walk's end and the
anchor are checked against what a node answers, not against a hand-made page list."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from click.testing import CliRunner

from fake_vault_server import FakeVaultServer, Reply
from protocol import Entry, EntryKind
from tokenvault.api.service import NodeService
from tokenvault.audit_chain import ChainVerifier
from tokenvault.cli.main import tokenvault
from tokenvault.core.commands import Actor, AuditCommand, AuditRecord, AuditTrimCommand, encode_command
from tokenvault.core.store import VaultStore
from tokenvault.core.store_layout import AUDIT, AUDIT_ANCHOR_KEY, pack

ADMIN_KEY = "tvk_" + "a" * 43


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    for name in ("TOKENVAULT_URL", "TOKENVAULT_API_KEY", "TOKENVAULT_CLUSTER_JSON", "TOKENVAULT_CA_FILE"):
        monkeypatch.delenv(name, raising=False)
    return CliRunner(env={"COLUMNS": "200"})


@pytest.fixture
def server() -> Iterator[FakeVaultServer]:
    with FakeVaultServer("n1", role="primary", api_key=ADMIN_KEY) as fake:
        yield fake


def _store_with_records(path: Path, count: int) -> VaultStore:
    store = VaultStore.open(path)
    records = tuple(AuditRecord(3_000 + n, "n1", "reader", None, "detokenize", 5, 1, f"r{n}", None)
                    for n in range(count))
    store.apply_batch([Entry(1, 1, EntryKind.COMMAND, encode_command(AuditCommand(records)))])
    assert store.audit_seq == count
    return store


def _page(store: VaultStore, after: int, limit: int) -> dict[str, Any]:
    """GET /v1/admin/audit exactly as a real node answers it (NodeService.audit_page over the store)."""
    service = SimpleNamespace(node=SimpleNamespace(store=store))
    coroutine = NodeService.audit_page(service, after, limit)  # type: ignore[arg-type]
    try:
        coroutine.send(None)  # it never awaits: the whole answer comes at once
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    raise AssertionError("audit_page awaited")


def _serve(server: FakeVaultServer, answer: Callable[[int, int], dict[str, Any]],
           between_pages: Callable[[int], None] = lambda after: None) -> None:
    def respond(request: Any) -> Reply:
        after = int(request.query["after"])
        reply = Reply(200, answer(after, int(request.query["limit"])))
        between_pages(after)
        return reply

    server.responders[("GET", "/v1/admin/audit")] = respond


def _cut_off_newest(store: VaultStore) -> None:
    """The newest record removed on disk; the head still names it."""
    del store._db[b"A" + store.audit_seq.to_bytes(8, "big")]


def _invoke(runner: CliRunner, server: FakeVaultServer, *arguments: str) -> Any:
    return runner.invoke(tokenvault, ["admin", "audit", *arguments, "--url", server.url, "--api-key", ADMIN_KEY])


# ---------------------------------------------------------------- the node's pages


def test_a_page_shorter_than_its_limit_or_empty_is_the_last(tmp_path: Path) -> None:
    store = _store_with_records(tmp_path / "store", 10)
    try:
        assert [(len(page["records"]), page["next_after"]) for page in (
            _page(store, 0, 4), _page(store, 4, 4), _page(store, 8, 4))] == [(4, 4), (4, 8), (2, None)]
        assert _page(store, 2, 8)["next_after"] is None  # a full page that reaches the head: no empty page after
        assert _page(store, 10, 4) == {"records": [], "last_seq": 10, "next_after": None, "anchor": None}
        _cut_off_newest(store)
        short = _page(store, 8, 4)
        assert ([record["seq"] for record in short["records"]], short["last_seq"], short["next_after"]) == ([9], 10, None)
        assert _page(store, 9, 4) == {"records": [], "last_seq": 10, "next_after": None, "anchor": None}
    finally:
        store.close()


# ---------------------------------------------------------------- records cut off at the end


@pytest.mark.parametrize("node", ["this", "before-the-fix"])
def test_verify_reports_the_newest_record_cut_off_on_disk_and_exits_4(
        runner: CliRunner, server: FakeVaultServer, tmp_path: Path, node: str) -> None:
    """docs/security.md: verify detects records cut off at the end, also against a node that still answers
    its last page with next_after = its last record and then an empty page with next_after = after."""
    store = _store_with_records(tmp_path / "store", 10)
    _cut_off_newest(store)

    def before_the_fix(after: int, limit: int) -> dict[str, Any]:
        records = store.audit_page(after, limit)
        last = records[-1]["seq"] if records else after
        return {"records": records, "last_seq": store.audit_seq,
                "next_after": last if last < store.audit_seq else None, "anchor": None}

    _serve(server, (lambda after, limit: _page(store, after, limit)) if node == "this" else before_the_fix)
    try:
        result = _invoke(runner, server, "verify", "--json")
    finally:
        store.close()
    assert result.exit_code == 4, result.output
    summary = json.loads(result.stdout)
    assert (summary["ok"], summary["verified"], summary["broken_seq"], summary["last_seq"]) == (False, 9, 10, 10)
    assert "the trail's head is record 10" in summary["reason"]


def test_export_of_a_trail_cut_off_at_the_end_exits_4_and_keeps_what_verified(
        runner: CliRunner, server: FakeVaultServer, tmp_path: Path) -> None:
    store = _store_with_records(tmp_path / "store", 1500)
    _cut_off_newest(store)
    _serve(server, lambda after, limit: _page(store, after, limit))
    out = tmp_path / "audit.jsonl"
    try:
        result = _invoke(runner, server, "export", "--out", str(out))
    finally:
        store.close()
    assert result.exit_code == 4, result.output
    assert "BROKEN at record 1500" in result.stderr and "head is record 1500" in result.stderr
    assert [json.loads(line)["seq"] for line in out.read_text().splitlines()] == list(range(1, 1500))


def test_an_intact_trail_verifies_whatever_the_page_boundaries(
        runner: CliRunner, server: FakeVaultServer, tmp_path: Path) -> None:
    store = _store_with_records(tmp_path / "store", 2000)  # two full pages, the second ending at the head
    _serve(server, lambda after, limit: _page(store, after, limit))
    try:
        result = _invoke(runner, server, "verify", "--json")
        head = store.audit_page(1999, 1)[0]["hash"]
    finally:
        store.close()
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["ok"], summary["verified"], summary["last_seq"], summary["head_hash"]) == (True, 2000, 2000, head)
    assert [call.query["after"] for call in server.calls("/v1/admin/audit")] == ["0", "1000"]


# ---------------------------------------------------------------- an anchor no trim made


def test_a_trail_whose_oldest_records_were_removed_behind_a_made_up_anchor_is_broken(
        runner: CliRunner, server: FakeVaultServer, tmp_path: Path) -> None:
    """docs/security.md, "audit verify": a trimmed trail verifies from its anchor, which its trim's own
    record names; records 1-5 deleted on disk with an anchor set to record 5's hash (no hash recomputed)
    are a broken link at the anchor, exit 4."""
    trimmed = _store_with_records(tmp_path / "trimmed", 10)
    through = trimmed.audit_page(4, 1)[0]
    trim = AuditTrimCommand(5, bytes.fromhex(through["hash"]), 9_000, Actor(name="admin", node="n1"))
    trimmed.apply_batch([Entry(2, 1, EntryKind.COMMAND, encode_command(trim))])
    _serve(server, lambda after, limit: _page(trimmed, after, limit))
    try:
        result = _invoke(runner, server, "verify", "--json")
    finally:
        trimmed.close()
    assert result.exit_code == 0, result.output
    assert (json.loads(result.stdout)["anchor_seq"], json.loads(result.stdout)["verified"]) == (5, 6)

    store = _store_with_records(tmp_path / "store", 10)
    anchor = store.audit_page(4, 1)[0]
    for seq in range(1, 6):
        del store._db[AUDIT + seq.to_bytes(8, "big")]
    store._db[AUDIT_ANCHOR_KEY] = pack([5, bytes.fromhex(anchor["hash"])])
    store.close()
    store = VaultStore.open(tmp_path / "store")
    assert store.audit_anchor[0] == 5
    _serve(server, lambda after, limit: _page(store, after, limit))
    try:
        result = _invoke(runner, server, "verify", "--json")
    finally:
        store.close()
    assert result.exit_code == 4, result.output
    summary = json.loads(result.stdout)
    assert (summary["ok"], summary["verified"], summary["broken_seq"]) == (False, 5, 5)
    assert "named by no audit.trim record" in summary["reason"]


# ---------------------------------------------------------------- a trim during the walk


def _trim_after_first_page(store: VaultStore, through_seq: int) -> Callable[[int], None]:
    """Commits a trim through ``through_seq`` once the first page has been answered."""
    head = store.audit_page(through_seq - 1, 1)[0]  # another operator's export ended at that record
    trim = AuditTrimCommand(through_seq, bytes.fromhex(head["hash"]), 9_000, Actor(name="admin", node="n1"))

    def between_pages(after: int) -> None:
        if after == 0:
            store.apply_batch([Entry(2, 1, EntryKind.COMMAND, encode_command(trim))])

    return between_pages


@pytest.mark.parametrize("command", ["verify", "export"])
def test_a_trim_past_the_verified_records_during_the_walk_stops_with_exit_5_not_a_broken_link(
        runner: CliRunner, server: FakeVaultServer, tmp_path: Path, command: str) -> None:
    store = _store_with_records(tmp_path / "store", 1500)
    _serve(server, lambda after, limit: _page(store, after, limit), _trim_after_first_page(store, 1200))
    out = tmp_path / "audit.jsonl"
    try:
        result = _invoke(runner, server, command, *(["--out", str(out)] if command == "export" else []))
    finally:
        store.close()
    assert result.exit_code == 5, result.output
    assert "BROKEN" not in result.output
    assert "trimmed through record 1200 during the walk" in result.stderr and "run again" in result.stderr
    if command == "export":
        assert [json.loads(line)["seq"] for line in out.read_text().splitlines()] == list(range(1, 1001))


def test_a_trim_during_the_walk_reported_as_json_names_the_anchor_and_exits_5(
        runner: CliRunner, server: FakeVaultServer, tmp_path: Path) -> None:
    store = _store_with_records(tmp_path / "store", 1500)
    _serve(server, lambda after, limit: _page(store, after, limit), _trim_after_first_page(store, 1200))
    try:
        result = _invoke(runner, server, "verify", "--json")
    finally:
        store.close()
    assert result.exit_code == 5, result.output
    summary = json.loads(result.stdout)
    assert (summary["ok"], summary["verified"], summary["broken_seq"], summary["trimmed_through"]) == (
        False, 1000, None, 1200)
    assert "run again" in summary["reason"]


def test_a_trim_of_records_already_verified_during_the_walk_does_not_stop_it(
        runner: CliRunner, server: FakeVaultServer, tmp_path: Path) -> None:
    """The records left still follow the last one verified, so the walk goes on to the head (which now
    holds the trim's own record)."""
    store = _store_with_records(tmp_path / "store", 1500)
    _serve(server, lambda after, limit: _page(store, after, limit), _trim_after_first_page(store, 800))
    out = tmp_path / "audit.jsonl"
    try:
        result = _invoke(runner, server, "export", "--out", str(out), "--json")
    finally:
        store.close()
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["ok"], summary["verified"], summary["last_seq"]) == (True, 1501, 1501)
    exported = [json.loads(line) for line in out.read_text().splitlines()]
    assert exported[-1]["action"] == "audit.trim"
    verifier = ChainVerifier()
    for record in exported:
        verifier.check(record)
