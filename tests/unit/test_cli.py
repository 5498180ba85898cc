"""Tests of the `tokenvault` click CLI against in-memory fake nodes on 127.0.0.1:0."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from fake_vault_server import FakeVaultServer, Reply, closed_port_url, node_tls_files, problem
from tokenvault.auth import ALL_SCOPES
from tokenvault.cli.main import tokenvault
from tokenvault.config import load_config

ADMIN_KEY = "tvk_" + "a" * 43
TOKENIZER_KEY = "tvk_" + "t" * 43


@pytest.fixture
def primary() -> Iterator[FakeVaultServer]:
    with FakeVaultServer("n1", role="primary", api_key=ADMIN_KEY) as server:
        yield server


@pytest.fixture
def backup() -> Iterator[FakeVaultServer]:
    with FakeVaultServer("n2", role="backup", api_key=ADMIN_KEY) as server:
        yield server


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    for name in ("TOKENVAULT_URL", "TOKENVAULT_API_KEY", "TOKENVAULT_CLUSTER_JSON", "TOKENVAULT_CA_FILE"):
        monkeypatch.delenv(name, raising=False)
    return CliRunner(env={"COLUMNS": "200"})


def test_status_table_shows_every_node_and_marks_the_down_one(
        runner: CliRunner, primary: FakeVaultServer, backup: FakeVaultServer) -> None:
    down = closed_port_url()
    result = runner.invoke(tokenvault, ["admin", "status", "--url", f"{primary.url},{down}", "--url", backup.url,
                                        "--api-key", ADMIN_KEY])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    primary_line = next(line for line in lines if primary.url in line)
    assert "n1" in primary_line and "primary" in primary_line and "42" in primary_line
    assert any(backup.url in line and "backup" in line for line in lines)
    assert any(down in line and "down" in line for line in lines)
    assert "Cluster view" in result.stdout and "match_index" in result.stdout
    assert ADMIN_KEY not in result.output


def test_a_nodes_text_in_a_table_is_shown_as_it_is_never_as_markup_or_terminal_control(
        runner: CliRunner, primary: FakeVaultServer) -> None:
    """A node's values went into rich tables as markup: "[red]...[/red]" or "[/]" restyled or hid the text,
    and an escape sequence reached the terminal (checked on the code before: the brackets were gone). Each
    cell is plain text now, and a character that is not printable a '?'."""
    primary.responders[("GET", "/v1/admin/cluster")] = lambda request: Reply(200, {"nodes": [
        {"id": "[red]n1[/red]", "role": "backup\x1b[2Jcleared", "[bold]note": "[/]"}]})
    result = runner.invoke(tokenvault, ["admin", "status", "--url", primary.url, "--api-key", ADMIN_KEY])
    assert result.exit_code == 0, result.output
    assert "[red]n1[/red]" in result.stdout and "[/]" in result.stdout and "[bold]note" in result.stdout
    assert "\x1b" not in result.stdout and "backup?[2Jcleared" in result.stdout


def test_the_member_tables_title_shows_the_nodes_configuration_index_as_it_is(
        runner: CliRunner, primary: FakeVaultServer) -> None:
    """The member list's title held the node's configuration_index as rich markup: a "[/]" or "[red]" in it
    restyled or hid the title, an escape sequence reached the terminal (checked on the code before)."""
    primary.responders[("GET", "/v1/admin/members")] = lambda request: Reply(200, {
        "primary_id": "n1", "configuration_index": "[red]7[/red]\x1b[2J", "committed": True, "commit_index": 7,
        "members": [{"id": "n1", "peer_addr": None, "role": "voter", "match_index": 7}]})
    result = runner.invoke(tokenvault, ["admin", "member", "list", "--url", primary.url, "--api-key", ADMIN_KEY])
    assert result.exit_code == 0, result.output
    assert "configuration at index [red]7[/red]?[2J, committed" in result.stdout
    assert "\x1b" not in result.stdout


def _long_cells(primary: FakeVaultServer) -> list[str]:
    """Give the fake node's cluster view, epochs, keys and members long cells; return each cell's text."""
    peer = "https://node-with-a-rather-long-name-1.tokenvault.example.internal:9443"
    created = "2026-12-04T20:00:00.000Z"
    primary.responders[("GET", "/v1/admin/cluster")] = lambda request: Reply(200, {"nodes": [
        {"id": "node-with-a-rather-long-name-1", "role": "primary", "reachable": False, "peer_addr": peer,
         "last_contact": created, "match_index": 1234567890123}]})
    primary.responders[("GET", "/v1/admin/epochs")] = lambda request: Reply(200, {"active_epoch": 1, "epochs": [
        {"epoch": 1, "created_at": "2026-12-04T20:00:00.123456789+00:00 (a long created_at)",
         "state": "active-and-then-some-more-state"}]})
    primary.responders[("GET", "/v1/admin/keys")] = lambda request: Reply(200, {"keys": [
        {"id": "0123456789abcdef0123456789abcdef", "name": "a-key-with-a-long-descriptive-name-for-ci",
         "scopes": ["admin", "detokenize", "detokenize_masked", "tokenize"], "created_at": created}]})
    primary.responders[("GET", "/v1/admin/members")] = lambda request: Reply(200, {
        "primary_id": "node-with-a-rather-long-name-1", "configuration_index": 1234567890, "committed": True,
        "members": [{"id": "node-with-a-rather-long-name-1", "peer_addr": peer, "role": "voter",
                     "match_index": 1234567890123, "added_at_index": 1234567890}]})
    return [primary.url, "node-with-a-rather-long-name-1", peer, created, "false", "1234567890123",
            "2026-12-04T20:00:00.123456789+00:00 (a long created_at)", "active-and-then-some-more-state",
            "0123456789abcdef0123456789abcdef", "a-key-with-a-long-descriptive-name-for-ci",
            "admin,detokenize,detokenize_masked,tokenize", "1234567890"]


TABLE_COMMANDS = (["status"], ["epoch", "list"], ["key", "list"], ["member", "list"])


def test_tables_piped_without_columns_show_every_cell_whole(
        runner: CliRunner, primary: FakeVaultServer) -> None:
    """Output that is not a terminal took rich's 80 columns: cells were cut with "…" (the URL as
    "http://127.0…", false as "fal…"), so a file or a program reading the tables lost characters (checked on
    the code before). Without COLUMNS, a table printed where stdout is not a terminal is as wide as it needs."""
    cells = _long_cells(primary)
    shown = ""
    for command in TABLE_COMMANDS:
        result = runner.invoke(tokenvault, ["admin", *command, "--url", primary.url, "--api-key", ADMIN_KEY],
                               env={"COLUMNS": None})
        assert result.exit_code == 0, result.output
        assert "…" not in result.stdout, result.stdout
        shown += result.stdout
    for cell in cells:
        assert cell in shown, cell


def test_tables_on_a_narrow_terminal_fold_cells_never_cut_them(
        runner: CliRunner, primary: FakeVaultServer) -> None:
    """Where the width is narrower than a table (here COLUMNS=40), a cell folds onto more lines: its
    characters are all shown, never replaced by "…" (checked on the code before)."""
    _long_cells(primary)
    for command in TABLE_COMMANDS:
        result = runner.invoke(tokenvault, ["admin", *command, "--url", primary.url, "--api-key", ADMIN_KEY],
                               env={"COLUMNS": "40"})
        assert result.exit_code == 0, result.output
        assert "…" not in result.stdout, result.stdout


def test_status_json_carries_health_and_cluster(runner: CliRunner, primary: FakeVaultServer) -> None:
    result = runner.invoke(tokenvault, ["admin", "status", "--json", "--url", primary.url, "--api-key", ADMIN_KEY])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    health = document["nodes"][0]["health"]
    assert (health["role"], health["view"], health["commit_index"], health["applied_index"],
            health["active_epoch"]) == ("primary", 3, 42, 41, 1)
    assert document["cluster"]["nodes"][1]["reachable"] is False


def test_status_without_key_shows_health_only(runner: CliRunner, primary: FakeVaultServer) -> None:
    result = runner.invoke(tokenvault, ["admin", "status", "--url", primary.url])
    assert result.exit_code == 0, result.output
    assert "primary" in result.stdout and "Cluster view" not in result.stdout
    assert primary.calls("/v1/admin/cluster") == []


def test_status_with_every_node_down_exits_3(runner: CliRunner) -> None:
    result = runner.invoke(tokenvault, ["admin", "status", "--url", closed_port_url(), "--timeout", "0.5"])
    assert result.exit_code == 3
    assert "down" in result.stdout


def test_status_names_a_down_nodes_url_once_in_its_line(runner: CliRunner, primary: FakeVaultServer) -> None:
    """The line on a node that is down said its URL twice ("URL: no node available: URL: Cannot connect ...",
    checked on the code before), and a node's error answer named it again as "(from URL)"."""
    down = closed_port_url()
    primary.responders[("GET", "/health")] = lambda request: problem(500, "Internal Server Error", "boom")
    result = runner.invoke(tokenvault, ["admin", "status", "--url", f"{down},{primary.url}", "--timeout", "0.5"])
    assert result.exit_code == 3
    down_line = next(line for line in result.stderr.splitlines() if down in line)
    assert down_line.startswith(f"{down}: ") and down_line.count(down) == 1, down_line
    assert "Cannot connect to host" in down_line
    failing_line = next(line for line in result.stderr.splitlines() if primary.url in line)
    assert failing_line == f"{primary.url}: 500 Internal Server Error: boom", failing_line


def test_epoch_rotate_fails_over_and_sends_the_idempotency_key(
        runner: CliRunner, backup: FakeVaultServer) -> None:
    result = runner.invoke(tokenvault, ["admin", "epoch", "rotate", "--url", closed_port_url(), "--url",
                                        backup.url, "--api-key", ADMIN_KEY, "--idempotency-key", "rot-7"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "epoch 2 is now active"
    sent = backup.calls("/v1/admin/epochs")[0]
    assert sent.headers["Idempotency-Key"] == "rot-7"
    assert sent.headers["Authorization"] == f"Bearer {ADMIN_KEY}"


def test_epoch_list_table_and_json(runner: CliRunner, primary: FakeVaultServer) -> None:
    primary.active_epoch = 3
    table = runner.invoke(tokenvault, ["admin", "epoch", "list", "--url", primary.url, "--api-key", ADMIN_KEY])
    assert table.exit_code == 0, table.output
    assert "active: 3" in table.stdout
    assert sum("retired" in line for line in table.stdout.splitlines()) == 2
    listed = runner.invoke(tokenvault, ["admin", "epoch", "list", "--json", "--url", primary.url,
                                        "--api-key", ADMIN_KEY])
    document = json.loads(listed.stdout)
    assert document["active_epoch"] == 3
    assert [entry["state"] for entry in document["epochs"]] == ["retired", "retired", "active"]


def test_environment_variables_supply_urls_and_key(runner: CliRunner, primary: FakeVaultServer) -> None:
    environment = {"TOKENVAULT_URL": f"{closed_port_url()},{primary.url}", "TOKENVAULT_API_KEY": ADMIN_KEY}
    result = runner.invoke(tokenvault, ["admin", "epoch", "rotate", "--json"], env=environment)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"epoch": 2, "replayed": False}


def test_problem_detail_is_shown_with_exit_1_and_never_the_key(
        runner: CliRunner, primary: FakeVaultServer) -> None:
    primary.responders[("POST", "/v1/admin/epochs")] = lambda request: problem(
        403, "Forbidden", "this API key lacks the admin scope")
    result = runner.invoke(tokenvault, ["admin", "epoch", "rotate", "--url", primary.url, "--api-key", ADMIN_KEY])
    assert result.exit_code == 1
    assert "403 Forbidden: this API key lacks the admin scope" in result.stderr
    assert ADMIN_KEY not in result.output


def test_wrong_key_is_401(runner: CliRunner, primary: FakeVaultServer) -> None:
    result = runner.invoke(tokenvault, ["admin", "epoch", "list", "--url", primary.url, "--api-key", "tvk_nope"])
    assert result.exit_code == 1
    assert "401" in result.stderr and "tvk_nope" not in result.output


def test_missing_url_is_a_usage_error(runner: CliRunner) -> None:
    result = runner.invoke(tokenvault, ["admin", "epoch", "list"])
    assert result.exit_code == 2
    assert "no node URL" in result.output


def test_unreachable_cluster_exits_3(runner: CliRunner) -> None:
    result = runner.invoke(tokenvault, ["admin", "epoch", "list", "--url", closed_port_url(), "--retry-seconds", "0.3"])
    assert result.exit_code == 3
    assert "no node available" in result.stderr


def _write_cluster_json(path: Path, urls: list[str]) -> None:
    nodes = [{"id": f"n{number}", "http_url": url} for number, url in enumerate(urls, start=1)]
    keys = {"admin": {"key": ADMIN_KEY, "scopes": ["admin"]},
            "tokenizer": {"key": TOKENIZER_KEY, "scopes": ["tokenize"]}}
    path.write_text(json.dumps({"nodes": nodes, "api_keys": keys}))


def test_cluster_json_supplies_urls_and_the_command_specific_key(
        runner: CliRunner, primary: FakeVaultServer, tmp_path: Path) -> None:
    cluster_file = tmp_path / "cluster.json"
    _write_cluster_json(cluster_file, [closed_port_url(), primary.url])
    primary.api_key = None
    rotated = runner.invoke(tokenvault, ["admin", "epoch", "rotate", "--cluster-json", str(cluster_file)])
    assert rotated.exit_code == 0, rotated.output
    tokenized = runner.invoke(tokenvault, ["tokenize", "--cluster-json", str(cluster_file)], input="v1\n")
    assert tokenized.exit_code == 0, tokenized.output
    assert primary.calls("/v1/admin/epochs")[0].headers["Authorization"] == f"Bearer {ADMIN_KEY}"
    assert primary.calls("/v1/tokenize")[0].headers["Authorization"] == f"Bearer {TOKENIZER_KEY}"


def test_tokenize_and_detokenize_pass_the_format_ttl_and_epoch(runner: CliRunner, primary: FakeVaultServer) -> None:
    options = ["--url", primary.url, "--api-key", ADMIN_KEY]
    tokenized = runner.invoke(tokenvault, ["tokenize", *options, "--format", "card", "--ttl-seconds", "60"],
                              input="4111 1111 1111 1111\n")
    assert tokenized.exit_code == 0, tokenized.output
    assert primary.calls("/v1/tokenize")[0].body == {"values": ["4111 1111 1111 1111"], "format": "card",
                                                      "ttl_seconds": 60}
    detokenized = runner.invoke(tokenvault, ["detokenize", *options, "--epoch", "3", "0000000000001111"])
    assert detokenized.exit_code == 0, detokenized.output
    assert primary.calls("/v1/detokenize")[0].body == {"tokens": ["0000000000001111"], "epoch": 3}
    refused = runner.invoke(tokenvault, ["tokenize", *options, "--ttl-seconds", "0"], input="v\n")
    assert refused.exit_code != 0 and not primary.calls("/v1/tokenize")[1:]


def test_tokenize_from_stdin_and_detokenize_round_trip(runner: CliRunner, primary: FakeVaultServer) -> None:
    values = ["4111 1111 1111 1111", "5500 0000 0000 0004"]
    options = ["--url", primary.url, "--api-key", ADMIN_KEY]
    tokenized = runner.invoke(tokenvault, ["tokenize", *options], input="\n".join(values) + "\n\n")
    assert tokenized.exit_code == 0, tokenized.output
    tokens = tokenized.stdout.split()
    assert tokens == [primary.token_for(value, 1) for value in values]
    assert not any(value in tokenized.output for value in values)
    unknown = "tv1_" + "c" * 32
    detokenized = runner.invoke(tokenvault, ["detokenize", *options, "--json", *tokens, unknown])
    assert detokenized.exit_code == 0, detokenized.output
    assert json.loads(detokenized.stdout) == [*values, None]
    assert "1 of 3 tokens are unknown" in detokenized.stderr


def test_tokenize_splits_large_input_into_batches_of_1000(runner: CliRunner, primary: FakeVaultServer) -> None:
    values = [f"value-{number}" for number in range(2500)]
    result = runner.invoke(tokenvault, ["tokenize", "--url", primary.url, "--api-key", ADMIN_KEY],
                           input="\n".join(values))
    assert result.exit_code == 0, result.output
    assert [len(call.body["values"]) for call in primary.calls("/v1/tokenize")] == [1000, 1000, 500]
    assert len(result.stdout.split()) == 2500


def test_tokenize_refuses_an_idempotency_key_for_several_batches(
        runner: CliRunner, primary: FakeVaultServer) -> None:
    result = runner.invoke(tokenvault, ["tokenize", "--url", primary.url, "--idempotency-key", "k"],
                           input="\n".join(str(number) for number in range(1001)))
    assert result.exit_code == 2
    assert primary.calls("/v1/tokenize") == []


# Input is read a batch at a time, each sent and printed before the next is read: memory holds one batch
# (at most 1,000 lines and 4 MiB), whatever the size of the input (it was read whole first, unbounded).


def test_a_batch_is_sent_and_printed_before_the_rest_of_the_input_is_read(primary: FakeVaultServer) -> None:
    """A real process on a pipe: its first 1,000 tokens come out while stdin is still open (checked on the
    code before: nothing was sent until stdin closed)."""
    import os
    import subprocess
    import sys
    import time

    environment = {name: value for name, value in os.environ.items() if not name.startswith("TOKENVAULT_")}
    process = subprocess.Popen([sys.executable, "-m", "tokenvault.cli", "tokenize", "--url", primary.url,
                                "--api-key", ADMIN_KEY], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=environment, cwd=Path(__file__).parents[2])
    assert process.stdin is not None and process.stdout is not None
    try:
        process.stdin.write("".join(f"value-{number}\n" for number in range(1001)).encode())
        process.stdin.flush()
        deadline = time.monotonic() + 30
        while not primary.calls("/v1/tokenize") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [len(call.body["values"]) for call in primary.calls("/v1/tokenize")] == [1000]
        first = process.stdout.readline().decode().strip()
        assert first == primary.token_for("value-0", 1)
        process.stdin.write(b"value-1001\n")
        process.stdin.close()
        assert process.wait(timeout=60) == 0, process.stderr.read() if process.stderr else ""
        assert len(process.stdout.read().split()) == 1001
    finally:
        process.kill()
        process.wait()
    assert [len(call.body["values"]) for call in primary.calls("/v1/tokenize")] == [1000, 2]


def test_a_line_refused_after_a_batch_was_sent_names_the_lines_answered(
        runner: CliRunner, primary: FakeVaultServer) -> None:
    """An empty line between items, found in the second batch: the first 1,000 lines were answered and
    printed, the error says so, and nothing of the second batch is sent, so output line N still answers
    input line N."""
    lines = [f"value-{number}" for number in range(1500)]
    lines[1200] = ""
    result = runner.invoke(tokenvault, ["tokenize", "--url", primary.url, "--api-key", ADMIN_KEY],
                           input="\n".join(lines) + "\n")
    assert result.exit_code == 2, result.output
    assert "line 1201 is empty" in result.output and "(lines 1 to 1000 were answered above)" in result.output
    assert [len(call.body["values"]) for call in primary.calls("/v1/tokenize")] == [1000]
    assert result.stdout.split() == [primary.token_for(value, 1) for value in lines[:1000]]


@pytest.mark.parametrize("command", ["tokenize", "detokenize"])
def test_a_line_longer_than_any_value_is_refused_by_its_number_never_shown_and_nothing_is_sent(
        runner: CliRunner, primary: FakeVaultServer, command: str) -> None:
    """A line is read at most 1 MiB and 2 characters at a time (the longest value a node takes, and its line
    end); a longer one is refused, not held whole."""
    from tokenvault.cli.main import MAX_LINE_CHARS

    longest = "7" * MAX_LINE_CHARS
    result = runner.invoke(tokenvault, [command, "--url", primary.url, "--api-key", ADMIN_KEY],
                           input=f"{longest}\r\n{longest}7\n")
    assert result.exit_code == 2, result.output[:300]
    assert f"line 2 is longer than {MAX_LINE_CHARS} bytes of UTF-8, more than any value (it is not shown)" in \
        result.output
    assert "7777" not in result.output
    assert primary.requests == []


def test_a_line_of_fewer_characters_than_any_value_has_bytes_but_more_bytes_is_refused(
        runner: CliRunner, primary: FakeVaultServer) -> None:
    """A value is bounded in UTF-8 bytes (MAX_VALUE_BYTES, as README says: a line longer than 1 MiB is a
    usage error); the line bound counted characters, so a line of euro signs (3 bytes each) of 3 MiB, under
    1 Mi characters, was sent (checked on the code before: exit 0, the fake node takes it). It is refused by
    its number before its batch is sent; the longest line of them that a value can be is taken."""
    from tokenvault.crypto.keys import MAX_VALUE_BYTES

    longest = "\u20ac" * (MAX_VALUE_BYTES // 3)
    result = runner.invoke(tokenvault, ["tokenize", "--url", primary.url, "--api-key", ADMIN_KEY],
                           input=f"{longest}\n{longest}\u20ac\n")
    assert result.exit_code == 2, result.output[:300]
    assert f"line 2 is longer than {MAX_VALUE_BYTES} bytes of UTF-8" in result.output
    assert "\u20ac" not in result.output and primary.requests == []
    taken = runner.invoke(tokenvault, ["tokenize", "--url", primary.url, "--api-key", ADMIN_KEY],
                          input=f"{longest}\n")
    assert taken.exit_code == 0, taken.output[:300]
    assert [call.body["values"] for call in primary.calls("/v1/tokenize")] == [[longest]]


def test_a_batch_closes_at_4_mib_of_values(runner: CliRunner, primary: FakeVaultServer) -> None:
    """1,000 values of 8 KiB (for a node with max_value_bytes = 8192) would make one body of 8 MiB and
    more, past a node's default max_body_bytes; a batch closes before its values pass 4 MiB."""
    from tokenvault.cli.main import MAX_BATCH_BYTES

    values = [f"{number:04d}" + "x" * 8188 for number in range(1100)]
    result = runner.invoke(tokenvault, ["tokenize", "--url", primary.url, "--api-key", ADMIN_KEY],
                           input="\n".join(values) + "\n")
    assert result.exit_code == 0, result.output[:300]
    sizes = [len(call.body["values"]) for call in primary.calls("/v1/tokenize")]
    assert sizes == [MAX_BATCH_BYTES // 8192, MAX_BATCH_BYTES // 8192, 1100 - 2 * (MAX_BATCH_BYTES // 8192)]
    assert result.stdout.split() == [primary.token_for(value, 1) for value in values]
    keyed = runner.invoke(tokenvault, ["tokenize", "--url", primary.url, "--api-key", ADMIN_KEY,
                                       "--idempotency-key", "k"], input="\n".join(values[:513]) + "\n")
    assert keyed.exit_code == 2 and "needs the values to fit one request" in keyed.output
    assert len(primary.calls("/v1/tokenize")) == 3


def test_detokenize_arguments_are_batched_by_the_same_bounds_as_stdin(
        runner: CliRunner, primary: FakeVaultServer) -> None:
    """Tokens given as arguments were cut into batches of 1,000 alone, by a second copy of the batching rule
    without the 4 MiB bound (checked on the code before: one request of 600 tokens, 4.8 MiB); they now go
    through the same one as stdin's lines."""
    from tokenvault.cli.main import MAX_BATCH_BYTES

    tokens = [f"tv1_{number:04d}" + "t" * 8184 for number in range(600)]
    result = runner.invoke(tokenvault, ["detokenize", "--json", "--url", primary.url, "--api-key", ADMIN_KEY,
                                        *tokens])
    assert result.exit_code == 0, result.output[:300]
    sizes = [len(call.body["tokens"]) for call in primary.calls("/v1/detokenize")]
    assert sizes == [MAX_BATCH_BYTES // 8192, 600 - MAX_BATCH_BYTES // 8192]
    assert json.loads(result.stdout) == [None] * 600


def test_detokenize_json_is_one_list_across_batches(runner: CliRunner, primary: FakeVaultServer) -> None:
    values = [f"value-{number}" for number in range(1500)]
    tokens = [primary.token_for(value, 1) for value in values]
    tokenized = runner.invoke(tokenvault, ["tokenize", "--url", primary.url, "--api-key", ADMIN_KEY],
                              input="\n".join(values) + "\n")
    assert tokenized.exit_code == 0, tokenized.output[:300]
    unknown = "tv1_" + "c" * 32
    result = runner.invoke(tokenvault, ["detokenize", "--json", "--url", primary.url, "--api-key", ADMIN_KEY],
                           input="\n".join([*tokens, unknown]) + "\n")
    assert result.exit_code == 0, result.output[:300]
    assert [len(call.body["tokens"]) for call in primary.calls("/v1/detokenize")] == [1000, 501]
    assert json.loads(result.stdout) == [*values, None]
    assert "1 of 1501 tokens are unknown" in result.stderr


def _failing_from_the_second_call(server: FakeVaultServer, path: str) -> None:
    """The node answers its first request on ``path`` as usual and refuses every later one."""
    def answer(request: object) -> Reply | None:
        return None if len(server.calls(path)) == 1 else problem(403, "Forbidden", "this API key was revoked")

    server.responders[("POST", path)] = answer


@pytest.mark.parametrize("from_stdin", [True, False], ids=["stdin", "arguments"])
def test_detokenize_json_that_fails_at_a_later_batch_prints_a_closed_list_of_the_values_answered(
        runner: CliRunner, primary: FakeVaultServer, from_stdin: bool) -> None:
    """The list was written a batch at a time and closed only at the end: a batch refused after the first
    left "[v1, ..., v1000" on stdout, which no JSON parser reads (checked on the code before). It is closed
    now, so stdout holds the values of the tokens answered, in order; the exit code says the command failed
    and stderr which tokens the list answers."""
    values = [f"value-{number}" for number in range(1500)]
    primary.mapping.update({primary.token_for(value, 1): value for value in values})
    tokens = [primary.token_for(value, 1) for value in values]
    _failing_from_the_second_call(primary, "/v1/detokenize")
    options = ["detokenize", "--json", "--url", primary.url, "--api-key", ADMIN_KEY]
    result = (runner.invoke(tokenvault, options, input="\n".join(tokens) + "\n") if from_stdin
              else runner.invoke(tokenvault, [*options, *tokens]))
    assert result.exit_code == 1, result.output[:300]
    assert json.loads(result.stdout) == values[:1000]
    what = "lines" if from_stdin else "token arguments"
    assert "this API key was revoked" in result.stderr and f"({what} 1 to 1000 were answered above)" in result.stderr
    assert [len(call.body["tokens"]) for call in primary.calls("/v1/detokenize")] == [1000, 500]


def test_detokenize_json_stopped_by_a_refused_line_prints_a_closed_list(
        runner: CliRunner, primary: FakeVaultServer) -> None:
    """A line refused in the second batch (here an empty one between tokens) stops the command the same way:
    the list of the first batch's values is closed (checked on the code before: left open)."""
    tokens = ["tv1_" + "c" * 32] * 1500
    tokens[1200] = ""
    result = runner.invoke(tokenvault, ["detokenize", "--json", "--url", primary.url, "--api-key", ADMIN_KEY],
                           input="\n".join(tokens) + "\n")
    assert result.exit_code == 2, result.output[:300]
    assert json.loads(result.stdout) == [None] * 1000
    assert "line 1201 is empty" in result.stderr and "(lines 1 to 1000 were answered above)" in result.stderr


@pytest.mark.parametrize("as_json", [True, False], ids=["json", "lines"])
def test_tokenize_that_fails_at_a_later_batch_says_which_lines_were_answered(
        runner: CliRunner, primary: FakeVaultServer, as_json: bool) -> None:
    """A node's error at the second batch said only the error: which of the lines printed answered which
    input was left to guess (checked on the code before). The error names them; with --json each batch is a
    JSON object of its own line, so what was printed is whole."""
    values = [f"value-{number}" for number in range(1500)]
    _failing_from_the_second_call(primary, "/v1/tokenize")
    result = runner.invoke(tokenvault, ["tokenize", "--url", primary.url, "--api-key", ADMIN_KEY,
                                        *(["--json"] if as_json else [])], input="\n".join(values) + "\n")
    assert result.exit_code == 1, result.output[:300]
    assert "this API key was revoked" in result.stderr and "(lines 1 to 1000 were answered above)" in result.stderr
    expected = [primary.token_for(value, 1) for value in values[:1000]]
    if as_json:
        assert [json.loads(line) for line in result.stdout.splitlines()] == [{"epoch": 1, "tokens": expected}]
    else:
        assert result.stdout.split() == expected


@pytest.mark.parametrize("character", ["\u20ac", "\x01"], ids=["three-byte-character", "control-character"])
def test_a_batch_closes_at_4_mib_of_values_as_sent_not_of_characters(
        runner: CliRunner, primary: FakeVaultServer, character: str) -> None:
    """A batch was bounded in characters, and a request carries its values as UTF-8 JSON: a euro sign is 3
    bytes, a control character 6 (\\u0001). 1,000 values of 4,096 of them (a node with max_value_bytes =
    16384 takes the euro signs, the default 4,096 the control characters) are under 4 Mi characters, one
    batch: a body of 12 MiB or 24 MiB, past a node's default max_body_bytes (checked on the code before: the
    fake node answers 413, exit 1). A batch closes before its values pass 4 MiB as they are sent."""
    from tokenvault.cli.main import MAX_BATCH_BYTES

    values = [f"{number:04d}" + character * 4092 for number in range(1000)]
    result = runner.invoke(tokenvault, ["tokenize", "--url", primary.url, "--api-key", ADMIN_KEY],
                           input="\n".join(values) + "\n")
    assert result.exit_code == 0, result.output[:300]
    calls = primary.calls("/v1/tokenize")
    assert sum(len(call.body["values"]) for call in calls) == 1000 and len(calls) > 1
    for call in calls:
        sent = sum(len(json.dumps(value, ensure_ascii=False).encode()) - 2 for value in call.body["values"])
        assert sent <= MAX_BATCH_BYTES
    assert result.stdout.split() == [primary.token_for(value, 1) for value in values]


def test_a_line_cut_at_the_read_bound_is_refused_even_where_the_cut_falls_in_carriage_returns() -> None:
    """A line is read at most MAX_LINE_CHARS + 2 characters at a time. One cut there, whose part read ended
    in carriage returns, lost them to the line-end strip and was taken as a value; the rest of it, its \\n,
    was then read as an empty line of its own, and every later line was numbered one too far (checked on
    the code before: "line 2 is empty", of an input whose line 2 is a value). A cut line is longer than
    any value and its line end: it is refused by its number. The stream is opened as Python opens stdin on
    a POSIX system (newline="\\n": a carriage return is a character; CliRunner's stdin would translate it)."""
    import io

    import click

    from tokenvault.cli.main import MAX_LINE_CHARS, _LineBatches

    line = "7" * (MAX_LINE_CHARS - 1) + "\r\r\r"
    stream = io.TextIOWrapper(io.BytesIO(f"{line}\nvalue-2\n".encode()), encoding="utf-8", newline="\n")
    with pytest.raises(click.UsageError) as refused:
        list(_LineBatches(stream, "value"))
    assert refused.value.message.startswith(f"line 1 is longer than {MAX_LINE_CHARS} bytes of UTF-8, more than any "
                                            "value (it is not shown)")
    assert "7777" not in refused.value.message
    # The same line with its line end where it belongs is a value, and the line after it line 2.
    stream = io.TextIOWrapper(io.BytesIO(("7" * MAX_LINE_CHARS + "\r\nvalue-2\n").encode()), encoding="utf-8",
                              newline="\n")
    assert [(len(batch), last) for batch, last in _LineBatches(stream, "value")] == [(2, 2)]


def test_serve_with_an_invalid_config_is_one_clear_line_and_exit_2(runner: CliRunner, tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text('node_id = "n1"\nthis is not toml\n')
    result = runner.invoke(tokenvault, ["serve", "--config", str(config)])
    assert result.exit_code == 2
    assert "not valid TOML" in result.stderr
    config.write_text('node_id = "n1"\n')
    result = runner.invoke(tokenvault, ["serve", "--config", str(config)])
    assert result.exit_code == 2 and "missing the required key" in result.stderr


def test_https_nodes_are_verified_with_ca_file_env_or_cluster_json(runner: CliRunner, tmp_path: Path) -> None:
    files = node_tls_files(tmp_path / "tls")
    with FakeVaultServer("n1", api_key=ADMIN_KEY, tls_files=files) as node:
        base = ["admin", "epoch", "list", "--url", node.url, "--api-key", ADMIN_KEY, "--retry-seconds", "0.3"]
        untrusted = runner.invoke(tokenvault, base)
        assert untrusted.exit_code == 3 and "certificate verify failed" in untrusted.stderr
        with_option = runner.invoke(tokenvault, [*base, "--ca-file", str(files.ca_file)])
        assert with_option.exit_code == 0, with_option.output
        with_environment = runner.invoke(tokenvault, base, env={"TOKENVAULT_CA_FILE": str(files.ca_file)})
        assert with_environment.exit_code == 0, with_environment.output
        cluster_file = tmp_path / "cluster.json"
        _write_cluster_json(cluster_file, [node.url])
        document = json.loads(cluster_file.read_text())
        cluster_file.write_text(json.dumps({**document, "ca_file": str(files.ca_file)}))
        from_cluster_json = runner.invoke(tokenvault, ["admin", "epoch", "list", "--cluster-json", str(cluster_file)])
        assert from_cluster_json.exit_code == 0, from_cluster_json.output
        assert len(node.calls("/v1/admin/epochs")) == 3


def test_a_missing_ca_file_is_a_usage_error(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(tokenvault, ["admin", "epoch", "list", "--url", "https://127.0.0.1:1", "--api-key",
                                        ADMIN_KEY, "--ca-file", str(tmp_path / "nope.crt")])
    assert result.exit_code == 2 and "nope.crt" in result.stderr and "does not exist" in result.stderr


def test_serve_refuses_a_bad_certificate_with_one_line_naming_the_file(runner: CliRunner, tmp_path: Path) -> None:
    from tokenvault.devcluster import cluster

    spec, _ = cluster.init_cluster(tmp_path / "vault", 1, 9300)
    config = load_config(spec.nodes[0].config)
    assert config.tls is not None
    config.tls.cert_file.write_text("-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
    result = runner.invoke(tokenvault, ["serve", "--config", str(spec.nodes[0].config)])
    assert result.exit_code == 2
    assert str(config.tls.cert_file) in result.stderr and "does not hold a PEM certificate" in result.stderr
    assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- connection options before or after


@pytest.mark.parametrize("placement", ["before", "after", "between-groups", "split"])
def test_connection_options_before_or_after_the_subcommand_are_the_same(
        runner: CliRunner, primary: FakeVaultServer, placement: str) -> None:
    connection = ["--url", primary.url, "--api-key", ADMIN_KEY]
    arguments = {
        "before": ["admin", *connection, "epoch", "rotate", "--json"],
        "after": ["admin", "epoch", "rotate", "--json", *connection],
        "between-groups": ["admin", "epoch", *connection, "rotate", "--json"],
        "split": ["admin", "--url", primary.url, "epoch", "rotate", "--api-key", ADMIN_KEY, "--json"],
    }[placement]
    result = runner.invoke(tokenvault, arguments)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"epoch": 2, "replayed": False}
    assert primary.calls("/v1/admin/epochs")[0].headers["Authorization"] == f"Bearer {ADMIN_KEY}"


def test_the_option_after_the_subcommand_wins_and_either_wins_over_the_environment(
        runner: CliRunner, primary: FakeVaultServer) -> None:
    after_wins = runner.invoke(tokenvault, ["admin", "--api-key", "tvk_wrong", "epoch", "list", "--url", primary.url,
                                            "--api-key", ADMIN_KEY])
    assert after_wins.exit_code == 0, after_wins.output
    before_wins = runner.invoke(tokenvault, ["admin", "--api-key", ADMIN_KEY, "--url", primary.url, "epoch", "list"],
                                env={"TOKENVAULT_API_KEY": "tvk_wrong", "TOKENVAULT_URL": closed_port_url()})
    assert before_wins.exit_code == 0, before_wins.output
    wrong_after = runner.invoke(tokenvault, ["admin", "--api-key", ADMIN_KEY, "epoch", "list", "--url", primary.url,
                                             "--api-key", "tvk_wrong"])
    assert wrong_after.exit_code == 1 and "401" in wrong_after.stderr


def test_cluster_json_before_the_subcommand(runner: CliRunner, primary: FakeVaultServer, tmp_path: Path) -> None:
    cluster_file = tmp_path / "cluster.json"
    _write_cluster_json(cluster_file, [primary.url])
    result = runner.invoke(tokenvault, ["admin", "--cluster-json", str(cluster_file), "epoch", "list", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["active_epoch"] == 1


@pytest.mark.parametrize("where", ["before", "after", "environment", "cluster.json"])
def test_ca_file_reaches_the_client_wherever_it_is_given(
        runner: CliRunner, primary: FakeVaultServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        where: str) -> None:
    import tokenvault.cli.connection as cli_module

    seen: list[str | None] = []
    real_client = cli_module.AsyncClient

    def recording_client(*arguments, **options):
        seen.append(options.get("ca_file"))
        return real_client(*arguments, **options)

    monkeypatch.setattr(cli_module, "AsyncClient", recording_client)
    ca_file = str(node_tls_files(tmp_path / "tls").ca_file)  # a real CA: the client loads it
    connection = ["--url", primary.url, "--api-key", ADMIN_KEY]
    environment: dict[str, str] = {}
    if where == "before":
        arguments = ["admin", "--ca-file", ca_file, "epoch", "list", *connection]
    elif where == "after":
        arguments = ["admin", "epoch", "list", *connection, "--ca-file", ca_file]
    elif where == "environment":
        arguments, environment = ["admin", "epoch", "list", *connection], {"TOKENVAULT_CA_FILE": ca_file}
    else:
        cluster_file = tmp_path / "cluster.json"
        _write_cluster_json(cluster_file, [primary.url])
        document = json.loads(cluster_file.read_text())
        document["ca_file"] = ca_file
        cluster_file.write_text(json.dumps(document))
        arguments = ["admin", "epoch", "list", "--cluster-json", str(cluster_file)]
    result = runner.invoke(tokenvault, arguments, env=environment)
    assert result.exit_code == 0, result.output
    assert seen == [ca_file]


# ---------------------------------------------------------------- runtime keys

RUNTIME_KEY = "tvk1_0123456789abcdef_" + "s" * 43


def _key_entry(key_id: str = "0123456789abcdef") -> dict:
    return {"id": key_id, "name": "ci", "scopes": ["detokenize", "tokenize"],
            "created_at": "2026-12-04T20:00:00.000Z"}


def test_key_create_prints_the_key_once_and_sends_name_and_scopes(
        runner: CliRunner, primary: FakeVaultServer) -> None:
    primary.responders[("POST", "/v1/admin/keys")] = lambda request: Reply(201, {**_key_entry(), "key": RUNTIME_KEY})
    result = runner.invoke(tokenvault, ["admin", "--url", primary.url, "--api-key", ADMIN_KEY, "key", "create",
                                        "--name", "ci", "--scope", "tokenize", "--scope", "detokenize",
                                        "--scope", "tokenize"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == RUNTIME_KEY
    assert "0123456789abcdef" in result.stderr and "shown only now" in result.stderr
    assert primary.calls("/v1/admin/keys")[0].body == {"name": "ci", "scopes": ["tokenize", "detokenize"]}


def test_the_nodes_text_in_key_create_and_audit_trim_reaches_the_terminal_as_printable_text(
        runner: CliRunner, primary: FakeVaultServer) -> None:
    """key create's line of the key's id, name and scopes, and audit trim's anchor hash, were the node's text
    as it came: a line break forged a line, an escape sequence drove the terminal (checked on the code
    before). Each character that is not printable is a '?'; a key that is not printable text is not shown."""
    options = ["--url", primary.url, "--api-key", ADMIN_KEY]
    primary.responders[("POST", "/v1/admin/keys")] = lambda request: Reply(201, {
        **_key_entry(), "name": "ci\x1b]0;owned\x07", "scopes": ["tokenize\nforged line"], "key": RUNTIME_KEY})
    created = runner.invoke(tokenvault, ["admin", "key", "create", "--name", "ci", "--scope", "tokenize", *options])
    assert created.exit_code == 0, created.output
    assert "created key 0123456789abcdef (ci?]0;owned?; scopes: tokenize?forged line)" in created.stderr
    assert created.stdout.strip() == RUNTIME_KEY and "\x07" not in created.output
    primary.responders[("POST", "/v1/admin/keys")] = lambda request: Reply(201, {
        **_key_entry(), "key": RUNTIME_KEY + "\nforged\x1b]0;owned\x07"})
    refused = runner.invoke(tokenvault, ["admin", "key", "create", "--name", "ci", "--scope", "tokenize", *options])
    assert refused.exit_code == 1 and refused.stdout == ""
    assert "the node answered a key that is not printable text (it is not shown): revoke key 0123456789abcdef" in \
        refused.stderr
    assert RUNTIME_KEY not in refused.output and "forged" not in refused.output
    primary.responders[("POST", "/v1/admin/audit/trim")] = lambda request: Reply(
        200, {"trimmed_through": 3, "removed": 3, "anchor_hash": "ab\nforged line\x1b]0;owned\x07"})
    trimmed = runner.invoke(tokenvault, ["admin", "audit", "trim", "--through", "3", "--hash", "ab", "--yes", *options])
    assert trimmed.exit_code == 0, trimmed.output
    assert trimmed.stdout == "audit trail trimmed through record 3 (3 records dropped); anchor ab?forged line?]0;owned?\n"


def test_key_list_shows_ids_names_scopes_and_never_a_key(runner: CliRunner, primary: FakeVaultServer) -> None:
    primary.responders[("GET", "/v1/admin/keys")] = lambda request: Reply(200, {"keys": [_key_entry()]})
    table = runner.invoke(tokenvault, ["admin", "key", "list", "--url", primary.url, "--api-key", ADMIN_KEY])
    assert table.exit_code == 0, table.output
    assert "0123456789abcdef" in table.stdout and "ci" in table.stdout and "detokenize,tokenize" in table.stdout
    listed = runner.invoke(tokenvault, ["admin", "key", "list", "--json", "--url", primary.url,
                                        "--api-key", ADMIN_KEY])
    assert json.loads(listed.stdout) == {"keys": [_key_entry()]}


def test_key_revoke_posts_to_the_key_and_a_missing_key_is_exit_1(
        runner: CliRunner, primary: FakeVaultServer) -> None:
    path = "/v1/admin/keys/0123456789abcdef/revoke"
    primary.responders[("POST", path)] = lambda request: Reply(200, {"id": "0123456789abcdef", "revoked": True})
    result = runner.invoke(tokenvault, ["admin", "key", "revoke", "0123456789abcdef", "--url", primary.url,
                                        "--api-key", ADMIN_KEY])
    assert result.exit_code == 0, result.output
    assert len(primary.calls(path)) == 1
    missing = runner.invoke(tokenvault, ["admin", "key", "revoke", "fedcba9876543210", "--url", primary.url,
                                         "--api-key", ADMIN_KEY])
    assert missing.exit_code == 1 and "404" in missing.stderr


# ---------------------------------------------------------------- audit verify


def _audit_records(count: int, trims: dict[int, int] | None = None) -> list[dict]:
    """``count`` chained records; ``trims`` maps a seq to the record the trim recorded there trimmed through."""
    from tokenvault.audit_chain import GENESIS_HASH, chain_hash, record_document

    records, previous = [], GENESIS_HASH
    for seq in range(1, count + 1):
        fields = [1_000 + seq, "n1", "detokenizer", None, "detokenize", 3, seq % 4 if seq % 4 <= 3 else 3,
                  f"req{seq}", None]
        if seq in (trims or {}):
            through = (trims or {})[seq]
            fields = [1_000 + seq, "n1", "admin", None, "audit.trim", through, through, f"req{seq}", str(through)]
        digest = chain_hash(previous, seq, fields)
        records.append(record_document(seq, fields, previous, digest))
        previous = digest
    return records


def _serve_audit(server: FakeVaultServer, records: list[dict], last_seq: int | None = None,
                 anchor: dict | None = None) -> None:
    """Answer GET /v1/admin/audit as a node does (NodeService.audit_page): up to ``limit`` of ``records``
    after ``after``, ``last_seq`` the head (default: the last record's seq), ``next_after`` null on a page
    shorter than ``limit`` (none included) or one reaching the head."""
    head = (records[-1]["seq"] if records else 0) if last_seq is None else last_seq

    def respond(request):
        after, limit = int(request.query["after"]), int(request.query["limit"])
        page = [record for record in records if record["seq"] > after][:limit]
        last = page[-1]["seq"] if page else after
        return Reply(200, {"records": page, "last_seq": head,
                           "next_after": last if len(page) == limit and last < head else None, "anchor": anchor})

    server.responders[("GET", "/v1/admin/audit")] = respond


def test_audit_verify_walks_every_page_of_an_intact_chain(runner: CliRunner, primary: FakeVaultServer) -> None:
    _serve_audit(primary, _audit_records(2500))
    result = runner.invoke(tokenvault, ["admin", "--url", primary.url, "--api-key", ADMIN_KEY, "audit", "verify",
                                        "--json"])
    assert result.exit_code == 0, result.output
    records = _audit_records(2500)
    assert json.loads(result.stdout) == {"ok": True, "verified": 2500, "last_seq": 2500, "broken_seq": None,
                                         "reason": None, "anchor_seq": 0, "head_hash": records[-1]["hash"]}
    assert len(primary.calls("/v1/admin/audit")) == 3


def test_audit_verify_of_a_trimmed_trail_starts_at_its_anchor_and_finds_a_wrong_one(
        runner: CliRunner, primary: FakeVaultServer) -> None:
    records = _audit_records(50, trims={40: 30})  # the trim's own record names its anchor, as a node writes it
    kept = records[30:]
    _serve_audit(primary, kept, anchor={"seq": 30, "hash": records[29]["hash"]})
    result = runner.invoke(tokenvault, ["admin", "--url", primary.url, "--api-key", ADMIN_KEY, "audit", "verify"])
    assert result.exit_code == 0, result.output
    assert "20 records after the anchor at record 30" in result.stdout
    _serve_audit(primary, kept, anchor={"seq": 30, "hash": records[28]["hash"]})
    result = runner.invoke(tokenvault, ["admin", "--url", primary.url, "--api-key", ADMIN_KEY, "audit", "verify"])
    assert result.exit_code == 4 and "BROKEN at record 31" in result.stderr


def test_audit_trim_sends_the_record_and_its_hash_and_asks_before_it_trims(runner: CliRunner, primary: FakeVaultServer) -> None:
    digest = "ab" * 32
    primary.responders[("POST", "/v1/admin/audit/trim")] = lambda request: Reply(
        200, {"trimmed_through": 30, "removed": 30, "anchor_hash": digest})
    result = runner.invoke(tokenvault, ["admin", "--url", primary.url, "--api-key", ADMIN_KEY, "audit", "trim",
                                        "--through", "30", "--hash", digest.upper(), "--yes"])
    assert result.exit_code == 0, result.output
    assert "trimmed through record 30 (30 records dropped)" in result.stdout
    (call,) = primary.calls("/v1/admin/audit/trim")
    assert call.body == {"through_seq": 30, "through_hash": digest}
    unconfirmed = runner.invoke(tokenvault, ["admin", "--url", primary.url, "--api-key", ADMIN_KEY, "audit", "trim",
                                             "--through", "30", "--hash", digest], input="n\n")
    assert unconfirmed.exit_code == 1 and len(primary.calls("/v1/admin/audit/trim")) == 1


@pytest.mark.parametrize("damage", ["field", "hash", "link", "gap", "truncated"])
def test_audit_verify_names_the_first_broken_link_and_exits_4(
        runner: CliRunner, primary: FakeVaultServer, damage: str) -> None:
    records = _audit_records(40)
    last_seq = None
    if damage == "field":
        records[16]["found"] = 0 if records[16]["found"] else 1
    elif damage == "hash":
        records[16]["hash"] = "00" * 32
    elif damage == "link":
        records[16]["prev_hash"] = records[14]["hash"]
    elif damage == "gap":
        del records[16]
    else:
        del records[16:]
        last_seq = 40
    _serve_audit(primary, records, last_seq)
    result = runner.invoke(tokenvault, ["admin", "audit", "verify", "--url", primary.url, "--api-key", ADMIN_KEY])
    assert result.exit_code == 4, result.output
    assert "BROKEN at record 17" in result.stderr


def test_audit_export_writes_every_verified_record_as_json_lines_and_never_overwrites(
        runner: CliRunner, primary: FakeVaultServer, tmp_path: Path) -> None:
    from tokenvault.audit_chain import ChainVerifier

    records = _audit_records(1200)
    _serve_audit(primary, records)
    out = tmp_path / "audit.jsonl"
    result = runner.invoke(tokenvault, ["admin", "--url", primary.url, "--api-key", ADMIN_KEY, "audit", "export",
                                        "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["verified"] == 1200
    exported = [json.loads(line) for line in out.read_text().splitlines()]
    assert exported == records and out.stat().st_mode & 0o777 == 0o600
    verifier = ChainVerifier()
    for record in exported:
        verifier.check(record)
    again = runner.invoke(tokenvault, ["admin", "--url", primary.url, "--api-key", ADMIN_KEY, "audit", "export",
                                       "--out", str(out)])
    assert again.exit_code == 2 and len(out.read_text().splitlines()) == 1200


def test_audit_export_stops_at_a_broken_link_and_exits_4(
        runner: CliRunner, primary: FakeVaultServer, tmp_path: Path) -> None:
    records = _audit_records(30)
    records[9]["items"] = 99
    _serve_audit(primary, records)
    out = tmp_path / "audit.jsonl"
    result = runner.invoke(tokenvault, ["admin", "audit", "export", "--out", str(out), "--url", primary.url,
                                        "--api-key", ADMIN_KEY])
    assert result.exit_code == 4 and "BROKEN at record 10" in result.stderr
    assert [json.loads(line)["seq"] for line in out.read_text().splitlines()] == list(range(1, 10))


@pytest.mark.parametrize("count", [1200, 3], ids=["during-the-walk", "at-close"])
def test_an_export_that_cannot_be_written_is_removed_and_exits_1_naming_the_file_and_why(
        runner: CliRunner, primary: FakeVaultServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        count: int) -> None:
    """The file's descriptor is pointed at /dev/full, which answers every write ENOSPC, as a full disk does:
    1,200 records fill the file's buffer during the walk, 3 only as it is closed. A write failing during the
    walk ended in a traceback and left the partial file (checked on the code before)."""
    import os

    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    _serve_audit(primary, _audit_records(count))
    out = tmp_path / "audit.jsonl"
    fdopen = os.fdopen

    def onto_a_full_disk(descriptor, *arguments, **options):
        if os.path.samestat(os.fstat(descriptor), os.stat(out)):
            full = os.open("/dev/full", os.O_WRONLY | os.O_CLOEXEC)
            os.dup2(full, descriptor)
            os.close(full)
        return fdopen(descriptor, *arguments, **options)

    monkeypatch.setattr(os, "fdopen", onto_a_full_disk)
    result = runner.invoke(tokenvault, ["admin", "audit", "export", "--out", str(out), "--url", primary.url,
                                        "--api-key", ADMIN_KEY])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert (f"error: cannot write {str(out)!r}: No space left on device; the partial file was removed: "
            f"export again") in result.stderr
    assert not out.exists() and result.stdout == ""


# ---------------------------------------------------------------- members


def test_member_add_adds_a_learner_retries_the_promotion_until_caught_up_and_remove_removes(
        runner: CliRunner, primary: FakeVaultServer) -> None:
    roles = {"n1": "voter"}
    addresses = {"n1": None}  # as the service lists them: None for a member the static config has
    refusals = [1]

    def members(request: object) -> Reply:
        return Reply(200, {"primary_id": "n1", "configuration_index": 3, "committed": True, "commit_index": 9,
                           "members": [{"id": node_id, "peer_addr": addresses[node_id], "role": role,
                                        "match_index": 9} for node_id, role in roles.items()]})

    def add(request: object) -> Reply:
        roles["n4"], addresses["n4"] = "learner", "127.0.0.1:8204"
        return Reply(201, {"action": "add", "node_id": "n4", "configuration_index": 4, "voters": ["n1"],
                           "learners": ["n4"]})

    def promote(request: object) -> Reply:
        if refusals:
            refusals.pop()
            return Reply(409, {"type": "urn:tokenvault:problem:membership-change-refused", "title": "Conflict",
                               "status": 409, "detail": "learner n4 has not caught up"},
                         headers={"Retry-After": "1"})
        roles["n4"] = "voter"
        return Reply(200, {"action": "promote", "node_id": "n4", "configuration_index": 5,
                           "voters": ["n1", "n4"], "learners": []})

    def remove(request: object) -> Reply:
        del roles["n4"]
        return Reply(200, {"action": "remove", "node_id": "n4", "configuration_index": 6, "voters": ["n1"],
                           "learners": []})

    primary.responders[("GET", "/v1/admin/members")] = members
    primary.responders[("POST", "/v1/admin/members")] = add
    primary.responders[("POST", "/v1/admin/members/n4/promote")] = promote
    primary.responders[("POST", "/v1/admin/members/n4/remove")] = remove
    options = ["--url", primary.url, "--api-key", ADMIN_KEY]
    added = runner.invoke(tokenvault, ["admin", "member", "add", "n4", "127.0.0.1:8204", "--wait", "10", *options])
    assert added.exit_code == 0, added.output
    assert roles["n4"] == "voter" and len(primary.calls("/v1/admin/members/n4/promote")) == 2
    assert primary.calls("/v1/admin/members")[1].body == {"node_id": "n4", "peer_addr": "127.0.0.1:8204"}
    assert "n4 added as a voter" in added.output
    again = runner.invoke(tokenvault, ["admin", "member", "add", "n4", "127.0.0.1:8204", *options])
    assert again.exit_code == 0, again.output  # done already: nothing is sent again, and it says so
    assert "n4 is a voter at 127.0.0.1:8204 already (committed): nothing was changed" in again.output
    assert "added" not in again.output
    assert len(primary.calls("/v1/admin/members/n4/promote")) == 2
    listed = runner.invoke(tokenvault, ["admin", "member", "list", "--json", *options])
    assert {member["id"]: member["role"] for member in json.loads(listed.stdout)["members"]} == {
        "n1": "voter", "n4": "voter"}
    removed = runner.invoke(tokenvault, ["admin", "member", "remove", "n4", *options])
    assert removed.exit_code == 0, removed.output
    assert "n4" not in roles


def test_key_create_help_names_every_scope_the_vault_knows(runner: CliRunner) -> None:
    result = runner.invoke(tokenvault, ["admin", "key", "create", "--help"])
    assert result.exit_code == 0
    assert all(scope in result.output for scope in ALL_SCOPES), result.output


def _member_list(members: list[dict[str, object]], committed: bool) -> Reply:
    return Reply(200, {"primary_id": "n1", "configuration_index": 7, "committed": committed,
                       "commit_index": 7 if committed else 6, "members": members})


_REFUSED = "urn:tokenvault:problem:membership-change-refused"


def test_member_add_fails_when_the_promotion_it_finds_is_still_uncommitted_at_the_end_of_its_wait(
        runner: CliRunner, primary: FakeVaultServer) -> None:
    # The primary holds the promotion of n4 at index 7, not committed (commit index 6): a leader change may
    # still truncate it, so the CLI must not say n4 is a voter.
    members = [{"id": "n1", "peer_addr": None, "role": "voter", "match_index": 6},
               {"id": "n4", "peer_addr": "127.0.0.1:8204", "role": "voter", "match_index": 6}]
    primary.responders[("GET", "/v1/admin/members")] = lambda request: _member_list(members, committed=False)
    result = runner.invoke(tokenvault, ["admin", "member", "add", "n4", "127.0.0.1:8204", "--wait", "2",
                                        "--url", primary.url, "--api-key", ADMIN_KEY])
    assert result.exit_code == 1, result.output
    assert "not committed" in result.output
    assert len(primary.calls("/v1/admin/members")) >= 2, "it polls the member list while it waits"


def test_member_add_that_finds_its_change_being_committed_waits_for_the_commit_then_reports_it(
        runner: CliRunner, primary: FakeVaultServer) -> None:
    members = [{"id": "n1", "peer_addr": None, "role": "voter", "match_index": 6},
               {"id": "n4", "peer_addr": "127.0.0.1:8204", "role": "voter", "match_index": 6}]
    polls: list[int] = []

    def listed(request: object) -> Reply:
        polls.append(1)
        return _member_list(members, committed=len(polls) > 3)

    primary.responders[("GET", "/v1/admin/members")] = listed
    result = runner.invoke(tokenvault, ["admin", "member", "add", "n4", "127.0.0.1:8204", "--wait", "10",
                                        "--url", primary.url, "--api-key", ADMIN_KEY])
    assert result.exit_code == 0, result.output
    # The change was made before (an earlier run's): this one waited for its commit and made nothing.
    assert "n4 is a voter at 127.0.0.1:8204 already (committed): nothing was changed" in result.output
    assert len(polls) > 4, "it polled until the list said committed, then went on to the promotion"
    assert not primary.calls("/v1/admin/members/n4/promote"), "a change found made is not proposed again"


def test_member_add_of_an_id_taken_at_another_address_fails_and_says_to_remove_it_first(
        runner: CliRunner, primary: FakeVaultServer) -> None:
    # n3 is a member at 10.0.0.3 (say, dead); the operator adds a new node under the id n3 at 10.0.0.9.
    members = [{"id": "n1", "peer_addr": None, "role": "voter", "match_index": 6},
               {"id": "n3", "peer_addr": "10.0.0.3:8103", "role": "voter", "match_index": 0}]
    primary.responders[("GET", "/v1/admin/members")] = lambda request: _member_list(members, committed=True)
    for learner_only in ([], ["--learner-only"]):
        result = runner.invoke(tokenvault, ["admin", "member", "add", "n3", "10.0.0.9:8103", "--wait", "2",
                                            *learner_only, "--url", primary.url, "--api-key", ADMIN_KEY])
        assert result.exit_code == 1, result.output  # nothing was added: n3 is still the old node
        assert "10.0.0.3:8103" in result.output and "member remove n3" in result.output
    assert [call.method for call in primary.calls("/v1/admin/members")] == ["GET", "GET"]
    assert not primary.calls("/v1/admin/members/n3/promote")


def test_member_remove_whose_first_try_timed_out_but_committed_exits_0(
        runner: CliRunner, primary: FakeVaultServer) -> None:
    roles = {"n1": "voter", "n4": "voter"}
    tries = []

    def members(request: object) -> Reply:
        return _member_list([{"id": node_id, "peer_addr": None, "role": role, "match_index": 7}
                             for node_id, role in roles.items()], committed=True)

    def remove(request: object) -> Reply:
        tries.append(1)
        if len(tries) == 1:  # the change was proposed, and commits just after the node's own timeout
            roles.pop("n4")
            return Reply(503, {"type": "urn:tokenvault:problem:unavailable", "title": "Service Unavailable",
                               "status": 503, "detail": "the change was not committed in time; it may still "
                                                        "take effect: list the members to see"})
        return Reply(409, {"type": _REFUSED, "title": "Conflict", "status": 409, "detail": "n4 is not a member"})

    primary.responders[("GET", "/v1/admin/members")] = members
    primary.responders[("POST", "/v1/admin/members/n4/remove")] = remove
    result = runner.invoke(tokenvault, ["admin", "member", "remove", "n4", "--url", primary.url,
                                        "--api-key", ADMIN_KEY])
    assert "n4" not in roles and len(tries) == 2
    assert result.exit_code == 0, result.output
    assert "n4 removed" in result.output


def test_member_remove_retries_while_another_change_is_pending_until_its_wait_ends(
        runner: CliRunner, primary: FakeVaultServer) -> None:
    roles = {"n1": "voter", "n4": "voter"}
    refusals = [1]

    def members(request: object) -> Reply:
        return _member_list([{"id": node_id, "peer_addr": None, "role": role, "match_index": 7}
                             for node_id, role in roles.items()], committed=True)

    def remove(request: object) -> Reply:
        if refusals:
            refusals.pop()
            return Reply(409, {"type": _REFUSED, "title": "Conflict", "status": 409,
                               "detail": "a membership change is still being committed"},
                         headers={"Retry-After": "1"})
        roles.pop("n4")
        return Reply(200, {"action": "remove", "node_id": "n4", "configuration_index": 8, "voters": ["n1"],
                           "learners": []})

    primary.responders[("GET", "/v1/admin/members")] = members
    primary.responders[("POST", "/v1/admin/members/n4/remove")] = remove
    options = ["--url", primary.url, "--api-key", ADMIN_KEY]
    result = runner.invoke(tokenvault, ["admin", "member", "remove", "n4", "--wait", "10", *options])
    assert result.exit_code == 0, result.output
    assert "n4" not in roles and len(primary.calls("/v1/admin/members/n4/remove")) == 2
    again = runner.invoke(tokenvault, ["admin", "member", "remove", "n4", *options])
    assert again.exit_code == 0, again.output  # done already: nothing is sent again
    assert len(primary.calls("/v1/admin/members/n4/remove")) == 2


def test_key_create_whose_answer_is_lost_is_not_sent_again_to_the_next_node(
        runner: CliRunner, primary: FakeVaultServer, backup: FakeVaultServer) -> None:
    """The first node creates the key (the cluster commits it) and the connection drops before the answer;
    the CLI must not create a second key through the next node (no Idempotency-Key protects it)."""
    from fake_vault_server import DROP

    created: list[str] = []

    def create_then_drop(request: object) -> str:
        created.append("via n1")
        return DROP

    def create(request: object) -> Reply:
        created.append("via n2")
        return Reply(201, {**_key_entry(), "key": RUNTIME_KEY})

    primary.responders[("POST", "/v1/admin/keys")] = create_then_drop
    backup.responders[("POST", "/v1/admin/keys")] = create
    result = runner.invoke(tokenvault, ["admin", "key", "create", "--name", "ci", "--scope", "admin",
                                        "--url", f"{primary.url},{backup.url}", "--api-key", ADMIN_KEY])
    assert created == ["via n1"], f"one create command made {len(created)} keys: {created}"
    assert result.exit_code != 0 and "unknown" in result.stderr and "tokenvault admin key list" in result.stderr
    assert RUNTIME_KEY not in result.output and ADMIN_KEY not in result.output


def test_key_revoke_whose_answer_is_lost_does_not_report_failure(
        runner: CliRunner, primary: FakeVaultServer, backup: FakeVaultServer) -> None:
    """The revoke is applied, its answer lost; the retry on the next node then finds no such key (404)."""
    from fake_vault_server import DROP

    key_id = "0123456789abcdef"
    revoked: set[str] = set()
    path = f"/v1/admin/keys/{key_id}/revoke"

    def revoke_then_drop(request: object) -> str:
        revoked.add(key_id)
        return DROP

    def revoke(request: object) -> Reply:
        if key_id in revoked:
            return problem(404, "Not Found", "no runtime API key has this id (it may have been revoked already)")
        revoked.add(key_id)
        return Reply(200, {"id": key_id, "revoked": True})

    primary.responders[("POST", path)] = revoke_then_drop
    backup.responders[("POST", path)] = revoke
    result = runner.invoke(tokenvault, ["admin", "key", "revoke", key_id, "--url", f"{primary.url},{backup.url}",
                                        "--api-key", ADMIN_KEY])
    assert key_id in revoked
    assert result.exit_code == 0, f"the key is revoked, yet: exit {result.exit_code}: {result.output}"


# `tokenize` and `detokenize` read one item a line and print one a line: output line N always answers
# input line N (a script pairs them by position).


def test_a_value_of_spaces_is_tokenized_and_an_empty_line_between_values_is_refused(
        runner: CliRunner, primary: FakeVaultServer) -> None:
    """A line of spaces was skipped as empty, so every later token answered the line before it (checked on
    the code before: two tokens for three lines)."""
    options = ["--url", primary.url, "--api-key", ADMIN_KEY]
    result = runner.invoke(tokenvault, ["tokenize", *options], input="4111\n   \n5500\n\n\n")
    assert result.exit_code == 0, result.output
    assert primary.calls("/v1/tokenize")[0].body == {"values": ["4111", "   ", "5500"]}
    assert len(result.stdout.splitlines()) == 3
    refused = runner.invoke(tokenvault, ["tokenize", *options], input="4111\n\n5500\n")
    assert refused.exit_code == 2 and "line 2 is empty" in refused.output
    assert len(primary.calls("/v1/tokenize")) == 1  # nothing sent


def test_a_value_holding_a_line_break_is_not_printed_one_a_line(runner: CliRunner, primary: FakeVaultServer) -> None:
    """Values may hold line breaks; printed one a line they shifted every later value onto the wrong token
    (checked on the code before: three lines for two tokens). Nothing is printed; --json shows them."""
    primary.responders[("POST", "/v1/detokenize")] = lambda request: Reply(200, {"values": ["line1\nline2", "v2"]})
    options = ["--url", primary.url, "--api-key", ADMIN_KEY, "tv1_" + "a" * 32, "tv1_" + "b" * 32]
    result = runner.invoke(tokenvault, ["detokenize", *options])
    assert result.exit_code == 1 and result.stdout == "" and "--json" in result.output
    as_json = runner.invoke(tokenvault, ["detokenize", *options, "--json"])
    assert as_json.exit_code == 0 and as_json.stdout.strip() == '["line1\\nline2", "v2"]'


@pytest.mark.parametrize("token", ["tv1_a\ntv1_b", "", "tv1_\x1b[2J"], ids=["line-break", "empty", "escape"])
def test_a_token_no_line_can_show_is_a_response_error_and_nothing_of_its_batch_is_printed(
        runner: CliRunner, primary: FakeVaultServer, token: str) -> None:
    """A node's token was printed as it came: one holding a line break took two output lines, so every later
    token answered the wrong value, and an escape sequence drove the terminal (checked on the code before:
    exit 0). No token is empty or holds a character that is not printable: the answer is out of contract."""
    primary.responders[("POST", "/v1/tokenize")] = lambda request: Reply(
        200, {"epoch": 1, "tokens": [token, primary.token_for("v2", 1)]})
    result = runner.invoke(tokenvault, ["tokenize", "--url", primary.url, "--api-key", ADMIN_KEY], input="v1\nv2\n")
    assert result.exit_code == 1, result.output
    assert result.stdout == "" and "tokenize response does not hold one token per value" in result.output


def test_member_remove_of_an_id_that_is_no_member_says_nothing_was_removed(
        runner: CliRunner, primary: FakeVaultServer) -> None:
    """`member remove n33` (a typo for n3) printed "n33 removed" and left n3 a voter (checked on the code
    before); it now says nothing was removed, and proposes nothing."""
    primary.responders[("GET", "/v1/admin/members")] = lambda request: Reply(200, {
        "primary_id": "n1", "configuration_index": 3, "committed": True, "commit_index": 9,
        "members": [{"id": member, "peer_addr": None, "role": "voter", "match_index": 9}
                    for member in ("n1", "n2", "n3")]})
    result = runner.invoke(tokenvault, ["admin", "member", "remove", "n33", "--url", primary.url, "--api-key", ADMIN_KEY])
    assert result.exit_code == 0, result.output
    assert "n33 removed" not in result.output and "nothing was removed" in result.output
    assert primary.calls("/v1/admin/members/n33/remove") == []


# Input that is not UTF-8: Python reads such bytes as lone surrogates (a command line; stdin in the C or a UTF-8
# locale) or fails on them mid-read (stdin in some locales, and CliRunner's). Either way the command ended in a
# traceback (checked on the code before). It is a usage error naming the line or the parameter, never the text:
# it may be a card number.

NOT_UTF8 = "secret-value-\udcff\udcfe1234"


@pytest.mark.parametrize("command", ["tokenize", "detokenize"])
def test_a_line_on_stdin_that_is_not_utf8_is_refused_by_its_number_never_shown_and_nothing_is_sent(
        runner: CliRunner, primary: FakeVaultServer, command: str) -> None:
    options = ["--url", primary.url, "--api-key", ADMIN_KEY]
    result = runner.invoke(tokenvault, [command, *options], input=b"4111 1111 1111 1111\nsecret-value-\xff\xfe1234\n")
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    what = "value" if command == "tokenize" else "token"
    assert f"line 2 is not valid UTF-8 (it is not shown): give one {what} a line, in UTF-8" in result.output
    assert "secret" not in result.output and "1234" not in result.output and "4111" not in result.output
    assert primary.requests == []


def test_a_token_argument_that_is_not_utf8_is_refused_by_its_position_never_shown(
        runner: CliRunner, primary: FakeVaultServer) -> None:
    result = runner.invoke(tokenvault, ["detokenize", "--url", primary.url, "--api-key", ADMIN_KEY,
                                        "tv1_" + "a" * 32, "tv1_" + NOT_UTF8])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert "token argument 2 is not valid UTF-8 (it is not shown)" in result.output
    assert "secret" not in result.output and "1234" not in result.output
    assert primary.requests == []


@pytest.mark.parametrize(("arguments", "parameter"), [
    (["tokenize", "--idempotency-key", NOT_UTF8], "'--idempotency-key'"),
    (["admin", "epoch", "rotate", "--idempotency-key", NOT_UTF8], "'--idempotency-key'"),
    (["admin", "key", "create", "--name", NOT_UTF8, "--scope", "admin"], "'--name'"),
    (["admin", "key", "create", "--name", "ops", "--scope", NOT_UTF8], "'--scope'"),
    (["admin", "key", "revoke", NOT_UTF8], "'KEY_ID'"),
    (["admin", "member", "add", NOT_UTF8, "127.0.0.1:7001"], "'NODE_ID'"),
    (["admin", "member", "add", "n4", NOT_UTF8], "'PEER_ADDR'"),
    (["admin", "member", "remove", NOT_UTF8], "'NODE_ID'"),
    (["admin", "audit", "trim", "--through", "3", "--hash", NOT_UTF8, "--yes"], "'--hash'"),
], ids=["tokenize-key", "rotate-key", "key-name", "key-scope", "key-id", "member-id", "member-addr",
        "remove-id", "trim-hash"])
def test_every_other_text_argument_sent_to_the_vault_that_is_not_utf8_is_a_usage_error_naming_it(
        runner: CliRunner, primary: FakeVaultServer, arguments: list[str], parameter: str) -> None:
    result = runner.invoke(tokenvault, [*arguments, "--url", primary.url, "--api-key", ADMIN_KEY], input="v\n")
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert f"Invalid value for {parameter}: is not valid UTF-8 (it is not shown)" in result.output
    assert "secret" not in result.output and "1234" not in result.output
    assert primary.requests == []


def test_the_command_line_of_a_real_process_given_bytes_that_are_not_utf8_is_a_usage_error(
        primary: FakeVaultServer) -> None:
    """The reviewer's commands, as a shell runs them: stdin and argv decoded by Python itself (surrogateescape,
    not CliRunner's strict stdin)."""
    import os
    import subprocess
    import sys

    environment = {**os.environ, "LC_ALL": "C.UTF-8"}
    for name in ("TOKENVAULT_URL", "TOKENVAULT_API_KEY", "TOKENVAULT_CLUSTER_JSON", "TOKENVAULT_CA_FILE"):
        environment.pop(name, None)
    options = [os.fsencode(option) for option in ("--url", primary.url, "--api-key", ADMIN_KEY, "--retry-seconds", "0")]
    runs = [([b"tokenize", *options], b"secret-value-\xff\xfe1234\n", "line 1 is not valid UTF-8"),
            ([b"detokenize", *options, b"tv1_secret\xff"], b"", "token argument 1 is not valid UTF-8")]
    for arguments, stdin, message in runs:
        done = subprocess.run([sys.executable.encode(), b"-m", b"tokenvault.cli", *arguments], input=stdin,
                              capture_output=True, env=environment, cwd=Path(__file__).parents[2], timeout=60)
        output = (done.stdout + done.stderr).decode("utf-8", "replace")
        assert done.returncode == 2, output
        assert message in output and "Traceback" not in output and "secret" not in output
    assert primary.requests == []
