"""The token lifecycle on a real three-node cluster (issue 13, parts 3, 4 and 5): a delete answers null
on every node at once, `admin epoch migrate` re-tokenizes an epoch resumably across a Ctrl-C, and
`admin epoch destroy` leaves the epoch's wrapped secret, and a delete leaves the deleted ciphertext,
in no file of any node (store, write-ahead log, logs)."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from harness import ClusterHarness, wait_for
from tokenvault.cli.main import tokenvault
from tokenvault.client.vault import Conflict, NotFound, Unprocessable
from tokenvault.core.store import VaultStore

# The file scan lives with the in-process node helpers, beside the unit tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from node_support import files_holding  # noqa: E402

pytestmark = pytest.mark.integration

VALUES = [f"lifecycle-value-{number:04d}" for number in range(120)]
CARD, CARD_DIGITS = "5555 5555 5555 4444", "5555555555554444"
ACCOUNT = "1234567890"
SHRED_DEADLINE_SECONDS = 15.0
MIGRATE_DEADLINE_SECONDS = 60.0


def files_holding_any(directory: Path, needles: dict[str, bytes]) -> list[str]:
    """Every file under ``directory`` holding one of ``needles``, as 'name: path'."""
    return [f"{label}: {path.relative_to(directory)}" for label, needle in needles.items()
            for path in files_holding(directory, needle)]


def secrets_on_disk(harness: ClusterHarness, node_id: str, deleted_token: str) -> dict[str, bytes]:
    """Epoch 1's wrapped secret and the deleted token's ciphertext, read from a stopped node's store
    (once it has applied everything the primary has committed)."""
    commit_index = max((health or {}).get("commit_index", 0) for health in harness.healths().values())
    harness.wait_for_applied([node_id], commit_index)
    harness.kill(node_id)
    store = VaultStore.open(harness.node(node_id).data_dir / "store")
    try:
        wrapped = store.epochs()[0].wrapped_secret
        ciphertext = store.lookup([deleted_token])[deleted_token]
    finally:
        store.close()
    harness.restart(node_id)
    return {"epoch 1 wrapped secret": wrapped, "deleted ciphertext": ciphertext}


def cli(harness: ClusterHarness, *arguments: str, input_text: str | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(tokenvault, ["admin", *arguments, "--cluster-json",
                                             str(harness.directory / "cluster.json")], input=input_text)
    return result.exit_code, result.output


def interrupted_migration(harness: ClusterHarness, state_file: Path) -> dict[str, object]:
    """Start `admin epoch migrate 1` in a process, Ctrl-C it once its first batch is saved; its saved state.
    The process handles SIGINT as one started from a terminal does, even when this suite runs as a
    background job (which a shell starts with SIGINT ignored, and its children inherit that)."""
    as_from_a_terminal = ("import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
                          "from tokenvault.cli.main import main; main()")
    command = [sys.executable, "-c", as_from_a_terminal, "admin", "epoch", "migrate", "1", "--batch-size", "2",
               "--state-file", str(state_file), "--cluster-json", str(harness.directory / "cluster.json")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: state_file.exists() or process.poll() is not None, MIGRATE_DEADLINE_SECONDS,
                 "the migration to save its first batch")
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=MIGRATE_DEADLINE_SECONDS)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr.decode(errors="replace")[-2000:]
    return json.loads(state_file.read_text())


def test_delete_migrate_and_destroy_leave_no_trace_on_any_node(make_cluster, tmp_path: Path) -> None:
    harness: ClusterHarness = make_cluster(3)

    async def issue() -> tuple[list[str], str, list[str]]:
        async with harness.client() as vault:
            tokens = list((await vault.tokenize(VALUES)).tokens)
            (doomed,) = (await vault.tokenize(["delete-me-please"])).tokens
            card = (await vault.tokenize([CARD], token_format="card", ttl_seconds=3600)).tokens
            digits = (await vault.tokenize([ACCOUNT], token_format="digits")).tokens
            return tokens, doomed, list(card + digits)

    tokens, doomed, format_tokens = asyncio.run(issue())
    needles = secrets_on_disk(harness, harness.node_ids[-1], doomed)
    before = files_holding_any(harness.directory, needles)
    assert any(entry.startswith("epoch 1 wrapped secret") for entry in before), "the scan must see it first"
    assert any(entry.startswith("deleted ciphertext") for entry in before), "the scan must see it first"

    async def delete() -> None:
        async with harness.client(list(reversed(harness.node_ids))) as vault:
            assert await vault.delete_tokens([doomed, doomed]) == 1
        async with harness.node_clients() as clients:  # at once, on every node
            for client in clients.values():
                assert await client.detokenize([doomed, tokens[0]]) == (None, VALUES[0])

    asyncio.run(delete())
    # The delete's own shred, before the destroy below shreds the log again: the deleted ciphertext
    # leaves every file of every node.
    deleted = {"deleted ciphertext": needles["deleted ciphertext"]}
    deadline = time.monotonic() + SHRED_DEADLINE_SECONDS
    while (left := files_holding_any(harness.directory, deleted)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left == [], left

    async def rotate() -> None:
        async with harness.client() as vault:
            assert (await vault.rotate_epoch()).epoch == 2

    asyncio.run(rotate())

    state_file = tmp_path / "migrate-1.json"
    saved = interrupted_migration(harness, state_file)
    assert saved["epoch"] == 1 and 0 < saved["migrated"] < len(VALUES)
    code, output = cli(harness, "epoch", "migrate", "1", "--batch-size", "50", "--state-file", str(state_file))
    assert code == 0, output
    # The card and digits tokens too: listed after the opaque ones, re-issued in their formats.
    assert f"migrated {len(VALUES) + 2} tokens of epoch 1 to epoch 2" in output and not state_file.exists()

    async def migrated() -> None:
        async with harness.client() as vault:
            # Listed before anything is re-tokenized here (a retokenize writes a missing token itself):
            # the migration created every one.
            page = await vault.epoch_tokens(2, None, 1000)
            assert len(page.tokens) == len(VALUES) + 2
            new = (await vault.retokenize(tokens)).tokens
            assert all(token is not None and token.startswith("tv2_") for token in new)
            new_format = (await vault.retokenize(format_tokens, epoch=1)).tokens
            assert set(new) | set(new_format) == set(page.tokens)
            assert await vault.detokenize(new) == tuple(VALUES)
            assert await vault.detokenize(new_format, epoch=2) == (CARD_DIGITS, ACCOUNT)
            format_in_2.extend(new_format)

    format_in_2: list[str] = []

    asyncio.run(migrated())

    code, output = cli(harness, "epoch", "destroy", "1", input_text="n\n")
    assert code != 0 and "destroyed" not in output.splitlines()[-1]
    code, output = cli(harness, "epoch", "destroy", "1", "--yes")
    assert (code, output.strip()) == (0, "epoch 1 is destroyed"), output

    deadline = time.monotonic() + SHRED_DEADLINE_SECONDS
    while (left := files_holding_any(harness.directory, needles)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left == [], left

    async def after_destroy() -> None:
        async with harness.node_clients() as clients:
            for client in clients.values():
                assert await client.detokenize(tokens[:3]) == (None, None, None)
                assert await client.detokenize(format_tokens, epoch=1) == (None, None)
                assert await client.detokenize(format_in_2, epoch=2) == (CARD_DIGITS, ACCOUNT)
                listing = await client.list_epochs()
                assert [(entry.epoch, entry.state) for entry in listing.epochs] == [(1, "destroyed"), (2, "active")]
        async with harness.client() as vault:
            with pytest.raises(Unprocessable):
                await vault.retokenize(tokens[:1])
            assert await vault.destroy_epoch(1) == "destroyed"  # again: 200
            with pytest.raises(Conflict):
                await vault.destroy_epoch(2)
            with pytest.raises(NotFound):
                await vault.destroy_epoch(9)

    asyncio.run(after_destroy())
