"""`tokenvault tokenize` and `detokenize` read one item a line and print one a line: output line N always
answers input line N (a script pairs them by position)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from click.testing import CliRunner

from fake_vault_server import FakeVaultServer, Reply
from tokenvault.cli.main import tokenvault

ADMIN_KEY = "tvk_" + "a" * 43


@pytest.fixture
def node() -> Iterator[FakeVaultServer]:
    with FakeVaultServer("n1", role="primary", api_key=ADMIN_KEY) as server:
        yield server


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    for name in ("TOKENVAULT_URL", "TOKENVAULT_API_KEY", "TOKENVAULT_CLUSTER_JSON", "TOKENVAULT_CA_FILE"):
        monkeypatch.delenv(name, raising=False)
    return CliRunner(env={"COLUMNS": "200"})


def test_a_value_of_spaces_is_tokenized_and_an_empty_line_between_values_is_refused(
        runner: CliRunner, node: FakeVaultServer) -> None:
    """A line of spaces was skipped as empty, so every later token answered the line before it (checked on
    the code before: two tokens for three lines)."""
    options = ["--url", node.url, "--api-key", ADMIN_KEY]
    result = runner.invoke(tokenvault, ["tokenize", *options], input="4111\n   \n5500\n\n\n")
    assert result.exit_code == 0, result.output
    assert node.calls("/v1/tokenize")[0].body == {"values": ["4111", "   ", "5500"]}
    assert len(result.stdout.splitlines()) == 3
    refused = runner.invoke(tokenvault, ["tokenize", *options], input="4111\n\n5500\n")
    assert refused.exit_code == 2 and "line 2 is empty" in refused.output
    assert len(node.calls("/v1/tokenize")) == 1  # nothing sent


def test_a_value_holding_a_line_break_is_not_printed_one_a_line(runner: CliRunner, node: FakeVaultServer) -> None:
    """Values may hold line breaks; printed one a line they shifted every later value onto the wrong token
    (checked on the code before: three lines for two tokens). Nothing is printed; --json shows them."""
    node.responders[("POST", "/v1/detokenize")] = lambda request: Reply(200, {"values": ["line1\nline2", "v2"]})
    options = ["--url", node.url, "--api-key", ADMIN_KEY, "tv1_" + "a" * 32, "tv1_" + "b" * 32]
    result = runner.invoke(tokenvault, ["detokenize", *options])
    assert result.exit_code == 1 and result.stdout == "" and "--json" in result.output
    as_json = runner.invoke(tokenvault, ["detokenize", *options, "--json"])
    assert as_json.exit_code == 0 and as_json.stdout.strip() == '["line1\\nline2", "v2"]'


def test_member_remove_of_an_id_that_is_no_member_says_nothing_was_removed(
        runner: CliRunner, node: FakeVaultServer) -> None:
    """`member remove n33` (a typo for n3) printed "n33 removed" and left n3 a voter (checked on the code
    before); it now says nothing was removed, and proposes nothing."""
    node.responders[("GET", "/v1/admin/members")] = lambda request: Reply(200, {
        "primary_id": "n1", "configuration_index": 3, "committed": True, "commit_index": 9,
        "members": [{"id": member, "peer_addr": None, "role": "voter", "match_index": 9}
                    for member in ("n1", "n2", "n3")]})
    result = runner.invoke(tokenvault, ["admin", "member", "remove", "n33", "--url", node.url, "--api-key", ADMIN_KEY])
    assert result.exit_code == 0, result.output
    assert "n33 removed" not in result.output and "nothing was removed" in result.output
    assert node.calls("/v1/admin/members/n33/remove") == []
