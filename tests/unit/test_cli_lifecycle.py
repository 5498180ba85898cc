"""`tokenvault admin epoch destroy` and `epoch migrate` against an in-memory fake node."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from fake_vault_server import FakeVaultServer, RecordedRequest, Reply, problem
from tokenvault.cli.main import tokenvault

KEY = "tvk_" + "f" * 43
OLD_TOKENS = sorted(f"tv1_{letter * 32}" for letter in "abcdefg")
UNKNOWN = OLD_TOKENS[4]  # answered null by re-tokenize (deleted meanwhile)


@pytest.fixture
def server() -> Iterator[FakeVaultServer]:
    with FakeVaultServer("n1", api_key=KEY) as fake:
        fake.active_epoch = 2
        fake.responders[("GET", "/v1/admin/epochs/1/tokens")] = _page
        fake.responders[("POST", "/v1/retokenize")] = _retokenize
        yield fake


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> CliRunner:
    # Why a directory of its own: `destroy` looks for a migration's state file in the current directory.
    monkeypatch.chdir(tmp_path)
    for name in ("TOKENVAULT_URL", "TOKENVAULT_API_KEY", "TOKENVAULT_CLUSTER_JSON", "TOKENVAULT_CA_FILE"):
        monkeypatch.delenv(name, raising=False)
    return CliRunner()


def _page(request: RecordedRequest) -> Reply:
    after, limit = request.query.get("after"), int(request.query["limit"])
    tokens = [token for token in OLD_TOKENS if after is None or token > after][:limit]
    return Reply(200, {"epoch": 1, "state": "retired", "tokens": tokens,
                       "next_after": tokens[-1] if len(tokens) == limit else None})


def _retokenize(request: RecordedRequest) -> Reply:
    tokens = request.body["tokens"]
    return Reply(200, {"epoch": 2, "tokens": [None if token == UNKNOWN else "tv2_" + token[4:] for token in tokens]})


def invoke(runner: CliRunner, server: FakeVaultServer, *arguments: str, input_text: str | None = None):
    return runner.invoke(tokenvault, ["admin", "epoch", *arguments, "--url", server.url, "--api-key", KEY],
                         input=input_text)


def test_destroy_asks_first_and_sends_nothing_when_refused(runner: CliRunner, server: FakeVaultServer) -> None:
    server.responders[("POST", "/v1/admin/epochs/1/destroy")] = lambda request: Reply(
        200, {"epoch": 1, "state": "destroyed"})
    refused = invoke(runner, server, "destroy", "1", input_text="n\n")
    assert refused.exit_code == 1 and server.calls("/v1/admin/epochs/1/destroy") == []
    confirmed = invoke(runner, server, "destroy", "1", input_text="y\n")
    assert confirmed.exit_code == 0 and "epoch 1 is destroyed" in confirmed.output
    assert invoke(runner, server, "destroy", "1", "--yes", "--json").output.strip() == \
        json.dumps({"epoch": 1, "state": "destroyed"})
    assert len(server.calls("/v1/admin/epochs/1/destroy")) == 2


def test_destroy_warns_of_a_migration_of_the_epoch_left_unfinished_and_with_yes_refuses_unless_told(
        runner: CliRunner, server: FakeVaultServer, tmp_path: Path) -> None:
    """A migration interrupted (Ctrl-C, a crash, a node's error) leaves its state file; destroying the epoch
    then lost the values of the tokens it had not reached, with no word of it (checked on the code before:
    --yes destroyed it at once). The warning comes before the question; --yes alone refuses, nothing sent."""
    server.responders[("POST", "/v1/admin/epochs/1/destroy")] = lambda request: Reply(
        200, {"epoch": 1, "state": "destroyed"})
    (tmp_path / ".tokenvault-migrate-1.json").write_text(json.dumps(
        {"epoch": 1, "after": OLD_TOKENS[2], "migrated": 3, "to_epochs": [2]}))
    refused = invoke(runner, server, "destroy", "1", input_text="n\n")
    assert refused.exit_code == 1
    warning = ("warning: .tokenvault-migrate-1.json is the state file of a migration of epoch 1 that was not "
               "finished (3 of its tokens re-tokenized, the rest not)")
    assert warning in refused.stderr and "'tokenvault admin epoch migrate 1' run again here" in refused.stderr
    assert refused.stderr.index(warning) < refused.stderr.index("Destroy epoch 1?")
    scripted = invoke(runner, server, "destroy", "1", "--yes")
    assert scripted.exit_code == 1 and warning in scripted.stderr
    assert "nothing was sent" in scripted.stderr and "--ignore-unfinished-migration" in scripted.stderr
    assert server.calls("/v1/admin/epochs/1/destroy") == []
    # A state file of another epoch's migration says nothing of this one, unless its tokens went there (below).
    other = invoke(runner, server, "destroy", "3", "--yes")
    assert "warning" not in other.stderr
    told = invoke(runner, server, "destroy", "1", "--yes", "--ignore-unfinished-migration", "--json")
    assert told.exit_code == 0 and warning in told.stderr
    assert json.loads(told.stdout) == {"epoch": 1, "state": "destroyed"}
    answered = invoke(runner, server, "destroy", "1", input_text="y\n")
    assert answered.exit_code == 0 and warning in answered.stderr
    assert len(server.calls("/v1/admin/epochs/1/destroy")) == 2


def test_destroy_warns_of_an_unfinished_migration_that_put_tokens_into_the_epoch_and_with_yes_refuses_unless_told(
        runner: CliRunner, server: FakeVaultServer, tmp_path: Path) -> None:
    """Destroying epoch 2 while a migration out of epoch 1 that re-tokenized tokens into it is unfinished
    takes their new tokens, and resuming that migration would skip them: it went without a word (checked
    on the code before: --yes destroyed it at once). Their old tokens keep their values, so the warning
    says to run that migration again with --restart. State files of migrations whose tokens went elsewhere,
    or that are not readable as a state, say nothing."""
    server.responders[("POST", "/v1/admin/epochs/2/destroy")] = lambda request: Reply(
        200, {"epoch": 2, "state": "destroyed"})
    (tmp_path / ".tokenvault-migrate-1.json").write_text(json.dumps(
        {"epoch": 1, "after": OLD_TOKENS[2], "migrated": 3, "to_epochs": [2, 3]}))
    (tmp_path / ".tokenvault-migrate-4.json").write_text(json.dumps(
        {"epoch": 4, "after": OLD_TOKENS[0], "migrated": 1, "to_epochs": [3]}))
    (tmp_path / ".tokenvault-migrate-5.json").write_text("not a state naming 2")
    (tmp_path / ".tokenvault-migrate-6.json").mkdir()
    warning = ("warning: .tokenvault-migrate-1.json is the state file of a migration of epoch 1 that was not "
               "finished and re-tokenized tokens into epoch 2 (3 of its tokens re-tokenized so far). Once epoch "
               "2 is destroyed, the new tokens it gave them there are gone, and resuming that migration would "
               "skip them. Their old tokens in epoch 1 keep their values: 'tokenvault admin epoch migrate 1 "
               "--restart' run here (before or after the destroy) re-tokenizes every token of epoch 1 into the "
               "active epoch.")
    refused = invoke(runner, server, "destroy", "2", input_text="n\n")
    assert refused.exit_code == 1 and warning in refused.stderr
    assert refused.stderr.index(warning) < refused.stderr.index("Destroy epoch 2?")
    assert refused.stderr.count("warning:") == 1
    scripted = invoke(runner, server, "destroy", "2", "--yes")
    assert scripted.exit_code == 1 and warning in scripted.stderr and "nothing was sent" in scripted.stderr
    assert server.calls("/v1/admin/epochs/2/destroy") == []
    told = invoke(runner, server, "destroy", "2", "--yes", "--ignore-unfinished-migration", "--json")
    assert told.exit_code == 0 and warning in told.stderr
    assert json.loads(told.stdout) == {"epoch": 2, "state": "destroyed"}
    # Epoch 3 is named too; epoch 5's file says nothing of where its tokens went.
    assert "into epoch 3" in invoke(runner, server, "destroy", "3", "--yes").stderr
    assert "warning" not in invoke(runner, server, "destroy", "7", "--yes").stderr


def test_destroy_reads_at_most_64_state_files_of_other_epochs_and_says_so(
        runner: CliRunner, server: FakeVaultServer, tmp_path: Path) -> None:
    for source in range(10, 80):
        (tmp_path / f".tokenvault-migrate-{source}.json").write_text(json.dumps(
            {"epoch": source, "after": OLD_TOKENS[0], "migrated": 1, "to_epochs": [2]}))
    result = invoke(runner, server, "destroy", "2", "--yes")
    assert result.exit_code == 1 and server.calls("/v1/admin/epochs/2/destroy") == []
    assert result.stderr.count("warning:") == 64
    assert ("note: more than 64 migration state files are in the current directory; only 64 were read for a "
            "migration into epoch 2") in result.stderr


@pytest.mark.parametrize("content", [None, "not a state"], ids=["state", "unreadable"])
def test_destroy_finds_the_state_file_given_with_state_file_and_one_it_cannot_read(
        runner: CliRunner, server: FakeVaultServer, tmp_path: Path, content: str | None) -> None:
    """`epoch migrate --state-file F` keeps it elsewhere: `destroy --state-file F` looks there. A file there
    that is not a state it can read is warned of all the same: it is where the state would be."""
    state = tmp_path / "elsewhere" / "migrate-1.json"
    state.parent.mkdir()
    state.write_text(content or json.dumps({"epoch": 1, "after": OLD_TOKENS[0], "migrated": 1}))
    result = invoke(runner, server, "destroy", "1", "--yes", "--state-file", str(state))
    assert result.exit_code == 1 and f"warning: {state} is the state file of a migration of epoch 1" in result.stderr
    done = "the file is not readable as its state" if content else "1 of its tokens re-tokenized, the rest not"
    assert done in result.stderr and "with the same --state-file" in result.stderr
    assert server.calls("/v1/admin/epochs/1/destroy") == []


def test_destroying_the_active_epoch_shows_the_problem_and_exits_1(runner: CliRunner, server: FakeVaultServer) -> None:
    server.responders[("POST", "/v1/admin/epochs/2/destroy")] = lambda request: problem(
        409, "Conflict", "the active epoch cannot be destroyed; rotate to a new epoch first")
    result = invoke(runner, server, "destroy", "2", "--yes")
    assert result.exit_code == 1 and "rotate to a new epoch first" in result.output


def test_migrate_pages_through_the_epoch_and_prints_the_count(
        runner: CliRunner, server: FakeVaultServer, tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    result = invoke(runner, server, "migrate", "1", "--batch-size", "3", "--state-file", str(state))
    assert result.exit_code == 0, result.output
    assert "migrated 6 tokens of epoch 1 to epoch 2" in result.output and not state.exists()
    sent = [request.body["tokens"] for request in server.calls("/v1/retokenize")]
    assert sent == [OLD_TOKENS[0:3], OLD_TOKENS[3:6], OLD_TOKENS[6:7]]


def test_migrate_resumes_after_the_saved_cursor(runner: CliRunner, server: FakeVaultServer, tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"epoch": 1, "after": OLD_TOKENS[2], "migrated": 3}))
    result = invoke(runner, server, "migrate", "1", "--batch-size", "2", "--state-file", str(state), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"epoch": 1, "to_epoch": 2, "to_epochs": [2],
                                                                       "migrated": 6}
    sent = [token for request in server.calls("/v1/retokenize") for token in request.body["tokens"]]
    assert sent == OLD_TOKENS[3:]


def test_migrate_names_every_epoch_its_tokens_went_to_when_the_active_epoch_changes_midway(
        runner: CliRunner, server: FakeVaultServer, tmp_path: Path) -> None:
    """A rotation during a migration sends the later batches to the new active epoch and leaves the earlier
    ones' tokens in the epoch before it: the CLI says both (it named only the last, so an operator could take
    the one before for empty of migrated values and destroy it), across a resume too."""
    batches = 0

    def rotated_after_two_batches(request: RecordedRequest) -> Reply:
        nonlocal batches
        batches += 1
        tokens = request.body["tokens"]
        epoch = 2 if batches <= 2 else 3
        return Reply(200, {"epoch": epoch, "tokens": [f"tv{epoch}_" + token[4:] for token in tokens]})

    server.responders[("POST", "/v1/retokenize")] = rotated_after_two_batches
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"epoch": 1, "after": OLD_TOKENS[0], "migrated": 1, "to_epochs": [2]}))
    result = invoke(runner, server, "migrate", "1", "--batch-size", "2", "--state-file", str(state))
    assert result.exit_code == 0, result.output
    assert "migrated 7 tokens of epoch 1 to epochs 2, 3" in result.output
    state.write_text(json.dumps({"epoch": 1, "after": OLD_TOKENS[0], "migrated": 1, "to_epochs": [2]}))
    batches = 0
    as_json = invoke(runner, server, "migrate", "1", "--batch-size", "2", "--state-file", str(state), "--json")
    assert json.loads(as_json.stdout.strip().splitlines()[-1]) == {"epoch": 1, "to_epoch": 3, "to_epochs": [2, 3],
                                                                  "migrated": 7}


@pytest.mark.parametrize("content", ["not json", json.dumps({"epoch": 7, "after": None, "migrated": 0}),
                                     json.dumps({"epoch": 1, "after": 5, "migrated": 0}), "x" * 10_000,
                                     json.dumps({"epoch": True, "after": None, "migrated": 0})])
def test_a_state_file_that_is_not_this_epochs_is_refused(
        runner: CliRunner, server: FakeVaultServer, tmp_path: Path, content: str) -> None:
    state = tmp_path / "state.json"
    state.write_text(content)
    result = invoke(runner, server, "migrate", "1", "--state-file", str(state))
    assert result.exit_code == 2 and "--restart" in result.output
    assert server.calls("/v1/retokenize") == []
    restarted = invoke(runner, server, "migrate", "1", "--state-file", str(state), "--restart")
    assert restarted.exit_code == 0 and "migrated 6 tokens" in restarted.output


def test_a_state_file_that_cannot_be_written_stops_migrate_before_any_batch_with_a_clear_error(
        runner: CliRunner, server: FakeVaultServer, tmp_path: Path) -> None:
    """The state file was first written after the first batch, whose write then failed with a traceback
    (checked on the code before: FileNotFoundError, a batch re-tokenized). It is written before the first
    batch; one that cannot be is a usage error naming it, and nothing is re-tokenized."""
    state = tmp_path / "no-such-directory" / "state.json"
    result = invoke(runner, server, "migrate", "1", "--state-file", str(state))
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert f"cannot write state file {str(state)!r}: No such file or directory; nothing was re-tokenized" in \
        result.output
    assert server.calls("/v1/retokenize") == []


def test_a_state_file_that_cannot_be_written_after_a_batch_stops_migrate_saying_how_to_resume(
        runner: CliRunner, server: FakeVaultServer, tmp_path: Path) -> None:
    """Its directory gone during the migration: exit 1 and a message, not a traceback (checked on the code
    before); the batch done is re-tokenized again when the command is run again."""
    import shutil

    state = tmp_path / "states" / "state.json"
    state.parent.mkdir()

    def retokenize_then_remove_the_directory(request: RecordedRequest) -> Reply:
        if len(server.calls("/v1/retokenize")) == 2:
            shutil.rmtree(state.parent)
        return _retokenize(request)

    server.responders[("POST", "/v1/retokenize")] = retokenize_then_remove_the_directory
    result = invoke(runner, server, "migrate", "1", "--batch-size", "3", "--state-file", str(state))
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert f"cannot write state file {str(state)!r}: No such file or directory" in result.output
    assert "run the same command again to resume" in result.output
    assert len(server.calls("/v1/retokenize")) == 2


@pytest.mark.parametrize("inclusive", [False, True], ids=["ignores-after", "includes-after"])
def test_migrate_stops_at_a_page_holding_its_cursor_keeping_the_state_file(
        runner: CliRunner, server: FakeVaultServer, tmp_path: Path, inclusive: bool) -> None:
    """A node that ignores `after` answers the first page again and again, and one that pages from `after`
    itself ends on a page of the cursor alone: the migration re-tokenized that page and wrote its cursor
    without end (checked on the code before, which the fake stops after 10 pages by answering an empty
    one: it exited 0). A page holding the cursor is a malformed answer: exit 1, nothing of it
    re-tokenized, the state file keeping the cursor of the last batch done."""
    pages = 0

    def out_of_contract(request: RecordedRequest) -> Reply:
        nonlocal pages
        pages += 1
        after, limit = request.query.get("after"), int(request.query["limit"])
        if pages > 10:
            tokens = []
        elif inclusive:
            tokens = [token for token in OLD_TOKENS if after is None or token >= after][:limit]
        else:
            tokens = OLD_TOKENS[:limit]
        return Reply(200, {"epoch": 1, "state": "retired", "tokens": tokens,
                           "next_after": tokens[-1] if tokens else None})

    server.responders[("GET", "/v1/admin/epochs/1/tokens")] = out_of_contract
    state = tmp_path / "state.json"
    result = invoke(runner, server, "migrate", "1", "--batch-size", "3", "--state-file", str(state))
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert ("error: the node answered a page of epoch 1's tokens that holds the token it was asked to start "
            "after") in result.stderr
    assert f"the state file {str(state)!r} keeps its cursor" in result.stderr
    assert [request.body["tokens"] for request in server.calls("/v1/retokenize")] == [OLD_TOKENS[0:3]]
    assert json.loads(state.read_text()) == {"epoch": 1, "after": OLD_TOKENS[2], "migrated": 3, "to_epochs": [2]}
    assert OLD_TOKENS[2] not in result.output


def test_migrating_the_active_epoch_is_refused(runner: CliRunner, server: FakeVaultServer, tmp_path: Path) -> None:
    result = invoke(runner, server, "migrate", "2", "--state-file", str(tmp_path / "s.json"))
    assert result.exit_code == 1 and "active epoch" in result.output
    assert server.calls("/v1/retokenize") == []


@pytest.fixture
def sigint_as(request: pytest.FixtureRequest) -> Iterator[None]:
    """SIGINT handled as the parameter says for the test (a suite run as a background job starts with it
    ignored), then as before."""
    original = signal.signal(signal.SIGINT, request.param)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, original)


def interrupt_during_the_first_batch(server: FakeVaultServer) -> None:
    def retokenize_then_interrupt(request: RecordedRequest) -> Reply:
        if len(server.calls("/v1/retokenize")) == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return _retokenize(request)

    server.responders[("POST", "/v1/retokenize")] = retokenize_then_interrupt


@pytest.mark.parametrize("sigint_as", [signal.default_int_handler], indirect=True)
def test_ctrl_c_stops_migrate_after_the_batch_in_flight_with_its_cursor_saved(
        runner: CliRunner, server: FakeVaultServer, tmp_path: Path, sigint_as: None) -> None:
    """The first Ctrl-C lets the batch in flight finish and saves its cursor, then exits 130; running the
    command again resumes after it. (The Ctrl-C arrives while the node re-tokenizes the first batch; the
    loop may hear of it only once the next batch has started, so it stops after the first or the second
    of the three, never in the middle of one. Before 2026-12-07 the batch in flight was cancelled: the
    node had done it, the cursor did not show it, and the state file was not even written.)"""
    interrupt_during_the_first_batch(server)
    state = tmp_path / "state.json"
    result = invoke(runner, server, "migrate", "1", "--batch-size", "3", "--state-file", str(state))
    assert result.exit_code == 130, result.output
    assert "interrupted; run the same command again to resume" in result.output
    sent = [request.body["tokens"] for request in server.calls("/v1/retokenize")]
    assert sent in ([OLD_TOKENS[0:3]], [OLD_TOKENS[0:3], OLD_TOKENS[3:6]])
    saved = json.loads(state.read_text())
    assert (saved["after"], saved["migrated"]) == (sent[-1][-1], sum(token != UNKNOWN for batch in sent for token in batch))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "the default handling is back"
    resumed = invoke(runner, server, "migrate", "1", "--batch-size", "3", "--state-file", str(state))
    assert resumed.exit_code == 0 and "migrated 6 tokens of epoch 1 to epoch 2" in resumed.output


@pytest.mark.parametrize("sigint_as", [signal.SIG_IGN], indirect=True)
def test_migrate_started_with_sigint_ignored_keeps_ignoring_it(
        runner: CliRunner, server: FakeVaultServer, tmp_path: Path, sigint_as: None) -> None:
    """As a shell starts a background job, and as Python itself does: the migration runs to its end."""
    interrupt_during_the_first_batch(server)
    result = invoke(runner, server, "migrate", "1", "--batch-size", "3", "--state-file", str(tmp_path / "s.json"))
    assert result.exit_code == 0 and "migrated 6 tokens of epoch 1 to epoch 2" in result.output
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
