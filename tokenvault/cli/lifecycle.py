"""`tokenvault admin epoch destroy` and `tokenvault admin epoch migrate` (tokenvault/cli/main.py adds them).

`destroy E` crypto-shreds epoch E on every node after a confirmation (`--yes`
skips it). A migration of E that was not finished leaves its state file; when
`destroy E` finds it (at its default name in the current directory, or at
`--state-file`) it warns before the confirmation, and with `--yes` refuses
(exit 1, nothing sent) unless `--ignore-unfinished-migration` is given: once E
is destroyed, the values of its tokens the migration had not reached are gone.
It does the same for an unfinished migration out of another epoch S that
re-tokenized tokens into E (a state file at its default name in the current
directory, at most 64 of them read, whose `to_epochs` names E): their new tokens
in E go with it, resuming that migration would skip them, and `migrate S
--restart` re-tokenizes them again from their old tokens, which keep their
values. `migrate E` re-tokenizes every token of epoch E into the active
epoch: it reads the epoch's tokens page by page (`GET
/v1/admin/epochs/E/tokens`, at most `--batch-size` per page, 1-1000) and sends
each page to `POST /v1/retokenize`, so the values never leave the vault. Before
the first batch (a state file it cannot write stops it there) and after every
batch it writes its cursor (the last token done) to a state file, with
write-temp + fsync + rename, so a crash loses at most the batch in flight, and
running the same command again resumes after the cursor. A page that holds the
cursor itself (a node that ignores `after` would answer the same page without
end) stops it as a malformed answer (exit 1, the cursor kept). It names every epoch
the tokens went to: a rotation during the migration sends the later batches to
the new active epoch, and the earlier ones stay in the epoch before it. Ctrl-C stops it once
the batch in flight is done and its cursor saved (exit 130); a second Ctrl-C
stops it at once.
Re-tokenizing is deterministic, so a batch done twice changes nothing. At the
end it prints how many tokens it re-tokenized and removes the state file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from tokenvault.cli.connection import EXIT_SERVICE_ERROR, Connection, connection_options, fail, run_client
from tokenvault.client.vault import AsyncClient, ResponseError
from tokenvault.smallfiles import FileTooLarge, read_small_file, replace_small_file

DEFAULT_BATCH_SIZE = 500
MAX_BATCH_SIZE = 1000
EXIT_INTERRUPTED = 130
STATE_FILE_TEMPLATE = ".tokenvault-migrate-{epoch}.json"
# A state file is a small JSON object; anything larger is not ours.
MAX_STATE_FILE_BYTES = 4096
# The name STATE_FILE_TEMPLATE gives a migration's state file, its epoch the group.
STATE_FILE_NAME = re.compile(r"\.tokenvault-migrate-([1-9][0-9]{0,9})\.json")
# `destroy E` reads at most this many state files of other epochs' migrations in the current directory.
MAX_STATE_FILES_READ = 64


def _unfinished_migration(state_path: Path, epoch_number: int) -> str | None:
    """The warning to give before EPOCH is destroyed when ``state_path`` holds the state file of a migration
    of it that was not finished (`epoch migrate` removes it once done), or None when there is none. The
    node keeps no record of migrations: the state file is all there is to go by."""
    if not os.path.lexists(state_path):
        return None
    try:
        _, migrated, _ = _read_state(state_path, epoch_number)
        done = f"{migrated} of its tokens re-tokenized, the rest not"
    except click.UsageError:
        done = "the file is not readable as its state"
    return (f"warning: {state_path} is the state file of a migration of epoch {epoch_number} that was not "
            f"finished ({done}). Once the epoch is destroyed, the values of the tokens it did not reach are "
            f"gone. Finish it first: 'tokenvault admin epoch migrate {epoch_number}' run again here (with the "
            f"same --state-file, if it was given one) resumes it.")


def _migrations_into(epoch_number: int) -> tuple[list[str], str | None]:
    """The warnings to give before EPOCH is destroyed for the state files in the current directory (at their
    default names) of unfinished migrations out of other epochs that re-tokenized tokens into EPOCH (their
    ``to_epochs`` names it), and a note when not every state file there was read (past
    MAX_STATE_FILES_READ, or the directory could not be listed). A file that is not readable as a state
    says nothing of where its tokens went, nor does one written before ``to_epochs`` was kept: it is
    passed over."""
    found: list[tuple[int, str]] = []
    read = 0
    note = None
    try:
        with os.scandir(".") as entries:
            for entry in entries:
                match = STATE_FILE_NAME.fullmatch(entry.name)
                if match is None or int(match[1]) == epoch_number:
                    continue
                if read == MAX_STATE_FILES_READ:
                    note = (f"note: more than {MAX_STATE_FILES_READ} migration state files are in the current "
                            f"directory; only {MAX_STATE_FILES_READ} were read for a migration into epoch "
                            f"{epoch_number}")
                    break
                read += 1
                source = int(match[1])
                try:
                    # Why is_file: opening a FIFO put there would wait for a writer.
                    if not entry.is_file():
                        continue
                    _, migrated, targets = _read_state(Path(entry.name), source)
                except (OSError, click.UsageError):
                    continue
                if epoch_number in targets:
                    found.append((source, _migration_into_warning(entry.name, source, epoch_number, migrated)))
    except OSError as error:
        note = (f"note: the current directory could not be listed ({error.strerror}), so no migration into "
                f"epoch {epoch_number} was looked for")
    return [warning for _, warning in sorted(found)], note


def _migration_into_warning(name: str, source: int, epoch_number: int, migrated: int) -> str:
    """The tokens such a migration re-tokenized into EPOCH got new tokens there, which the destroy takes with
    it, and resuming the migration would skip them (they are behind its cursor). Their old tokens in the
    source epoch keep their values (re-tokenizing leaves them valid), so the migration started again from
    its first token puts them into the active epoch."""
    return (f"warning: {name} is the state file of a migration of epoch {source} that was not finished and "
            f"re-tokenized tokens into epoch {epoch_number} ({migrated} of its tokens re-tokenized so far). "
            f"Once epoch {epoch_number} is destroyed, the new tokens it gave them there are gone, and resuming "
            f"that migration would skip them. Their old tokens in epoch {source} keep their values: "
            f"'tokenvault admin epoch migrate {source} --restart' run here (before or after the destroy) "
            f"re-tokenizes every token of epoch {source} into the active epoch.")


@click.command("destroy")
@connection_options("admin")
@click.argument("epoch_number", metavar="EPOCH", type=click.IntRange(1, 2**32 - 1))
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--state-file", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Where 'epoch migrate EPOCH' keeps its state file, if it was given one [default: "
                   f"./{STATE_FILE_TEMPLATE.format(epoch='EPOCH')}]; one found there is warned of.")
@click.option("--ignore-unfinished-migration", is_flag=True,
              help="With --yes: destroy EPOCH even when the state file of an unfinished migration of it, or "
                   "of one that re-tokenized tokens into it, is there.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def epoch_destroy(connection: Connection, epoch_number: int, yes: bool, state_file: str | None,
                  ignore_unfinished_migration: bool, as_json: bool) -> None:
    """Crypto-shred EPOCH on every node: its tokens can never be detokenized again.

    The active epoch is refused (rotate first). Backups taken before keep the epoch's secret. The state
    file of a migration of EPOCH that was not finished, and those in the current directory of unfinished
    migrations that re-tokenized tokens into EPOCH, are warned of before the confirmation; with --yes it
    refuses (exit 1, nothing sent) unless --ignore-unfinished-migration is given."""
    state_path = Path(state_file or STATE_FILE_TEMPLATE.format(epoch=epoch_number))
    own = _unfinished_migration(state_path, epoch_number)
    warnings, note = _migrations_into(epoch_number)
    if own is not None:
        warnings.insert(0, own)
    if note is not None:
        click.echo(note, err=True)
    for warning in warnings:
        click.echo(warning, err=True)
    if warnings and yes and not ignore_unfinished_migration:
        fail(f"not destroying epoch {epoch_number} with --yes while a migration of it, or one that "
             "re-tokenized tokens into it, is unfinished; nothing was sent. Do as the warning says, or add "
             "--ignore-unfinished-migration to destroy it anyway", EXIT_SERVICE_ERROR)
    if not yes:
        click.confirm(f"Destroy epoch {epoch_number}? Its tokens can never be detokenized or re-tokenized "
                      "again, on any node", abort=True, err=True)

    async def destroy() -> str:
        async with connection.client() as vault:
            return await vault.destroy_epoch(epoch_number)

    state = run_client(destroy())
    if as_json:
        click.echo(json.dumps({"epoch": epoch_number, "state": state}))
    else:
        click.echo(f"epoch {epoch_number} is {state}")


def _read_state(path: Path, epoch_number: int) -> tuple[str | None, int, list[int]]:
    """(cursor, tokens done, epochs they went to) from a state file of this epoch, or (None, 0, []) when
    there is none (a state file written before the epochs were kept says none)."""
    try:
        document = json.loads(read_small_file(path, MAX_STATE_FILE_BYTES))
    except FileNotFoundError:
        return None, 0, []
    except OSError as error:
        raise click.UsageError(f"cannot read state file {str(path)!r}: {error.strerror}") from None
    except (FileTooLarge, ValueError, RecursionError):  # RecursionError: nesting deeper than the parser's stack
        document = None
    # Why type() is int: True == 1, and a bool is no epoch.
    if (not isinstance(document, dict) or type(document.get("epoch")) is not int
            or document["epoch"] != epoch_number
            or not (document.get("after") is None or isinstance(document.get("after"), str))
            or type(document.get("migrated")) is not int
            or not isinstance(document.get("to_epochs", []), list)
            or not all(type(epoch) is int for epoch in document.get("to_epochs", []))):
        raise click.UsageError(f"state file {str(path)!r} is not a migration state of epoch {epoch_number}; "
                               "remove it or pass --restart")
    return document["after"], document["migrated"], document.get("to_epochs", [])


def _write_state(path: Path, epoch_number: int, after: str | None, migrated: int, targets: list[int]) -> None:
    replace_small_file(path, json.dumps({"epoch": epoch_number, "after": after, "migrated": migrated,
                                         "to_epochs": targets}).encode())


async def _migrate(vault: AsyncClient, epoch_number: int, batch_size: int, state_path: Path,
                   after: str | None, migrated: int, targets: list[int], progress: Progress,
                   stop: asyncio.Event) -> tuple[int, list[int]]:
    """Re-tokenize page after page from ``after``; returns (tokens re-tokenized, the epochs they went to, in
    order: more than one when the active epoch changed during the migration).
    Card and digits tokens come after the opaque ones, re-tokenized in the epoch they belong to. Once
    ``stop`` is set it returns after the batch in flight, whose cursor is saved (the caller checks it)."""
    listing = await vault.list_epochs()
    states = {entry.epoch: entry.state for entry in listing.epochs}
    if epoch_number not in states:
        fail(f"epoch {epoch_number} does not exist", EXIT_SERVICE_ERROR)
    if states[epoch_number] == "active":
        fail(f"epoch {epoch_number} is the active epoch: rotate first, then migrate it", EXIT_SERVICE_ERROR)
    if states[epoch_number] == "destroyed":
        fail(f"epoch {epoch_number} is destroyed: its values are gone", EXIT_SERVICE_ERROR)
    task = progress.add_task(f"epoch {epoch_number}", total=None, completed=migrated)
    targets = list(targets)
    try:
        # Why before the first batch: a state file that cannot be written (no such directory, no right to
        # write there) is found while nothing is re-tokenized yet.
        _write_state(state_path, epoch_number, after, migrated, targets)
    except OSError as error:
        raise click.UsageError(f"cannot write state file {str(state_path)!r}: {error.strerror}; nothing was "
                               "re-tokenized") from None
    while not stop.is_set():
        page = await vault.epoch_tokens(epoch_number, after, batch_size)
        if not page.tokens:
            return migrated, targets or [listing.active_epoch]
        if after is not None and after in page.tokens:
            # Why: a page holds only tokens after the cursor. A node that ignores `after` answers the same
            # page again and again, which would be re-tokenized and its cursor written without end.
            raise ResponseError(f"the node answered a page of epoch {epoch_number}'s tokens that holds the "
                                f"token it was asked to start after, so it does not page as the contract says; "
                                f"nothing of that page was re-tokenized and the state file "
                                f"{str(state_path)!r} keeps its cursor, which the same command resumes from")
        result = await vault.retokenize(page.tokens, epoch=epoch_number)
        if result.epoch not in targets:
            targets.append(result.epoch)
        migrated += sum(token is not None for token in result.tokens)
        try:
            _write_state(state_path, epoch_number, page.tokens[-1], migrated, targets)
        except OSError as error:
            raise click.ClickException(
                f"cannot write state file {str(state_path)!r}: {error.strerror}; it still holds the cursor "
                f"before the last batch: run the same command again to resume (that batch is re-tokenized "
                f"again, which changes nothing)") from None
        after = page.tokens[-1]
        progress.update(task, completed=migrated)
    return migrated, targets


@contextlib.contextmanager
def _stop_on_interrupt(stop: asyncio.Event) -> Iterator[None]:
    """While the migration runs, the first SIGINT sets ``stop`` (the batch in flight finishes and its
    cursor is saved) and puts the default handling back, so that a second one interrupts at once.
    (asyncio.run's own handling would cancel the request in flight, whose batch the node may have done
    without the cursor showing it.) A process started with SIGINT ignored, as a shell starts a
    background job, keeps ignoring it, as Python does."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        yield
        return
    loop = asyncio.get_running_loop()

    def on_interrupt() -> None:
        stop.set()
        loop.remove_signal_handler(signal.SIGINT)

    loop.add_signal_handler(signal.SIGINT, on_interrupt)
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGINT)


@click.command("migrate")
@connection_options("full")
@click.argument("epoch_number", metavar="EPOCH", type=click.IntRange(1, 2**32 - 1))
@click.option("--batch-size", type=click.IntRange(1, MAX_BATCH_SIZE), default=DEFAULT_BATCH_SIZE,
              show_default=True, help="Tokens read and re-tokenized per request.")
@click.option("--state-file", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help=f"Where the cursor is kept [default: ./{STATE_FILE_TEMPLATE.format(epoch='EPOCH')}].")
@click.option("--restart", is_flag=True, help="Ignore a saved cursor and start from the first token.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def epoch_migrate(connection: Connection, epoch_number: int, batch_size: int, state_file: str | None,
                  restart: bool, as_json: bool) -> None:
    """Re-tokenize every token of EPOCH into the active epoch, in batches, resumably.

    Needs a key with the admin and retokenize scopes (cluster.json's `full`). The old tokens stay
    valid; each old token's new one is what `POST /v1/retokenize` answers for it."""
    state_path = Path(state_file or STATE_FILE_TEMPLATE.format(epoch=epoch_number))
    after, migrated, targets = (None, 0, []) if restart else _read_state(state_path, epoch_number)
    if after is not None and not as_json:
        click.echo(f"resuming after {migrated} tokens (state file {state_path})", err=True)

    stop = asyncio.Event()

    async def run() -> tuple[int, list[int]]:
        columns: list[Any] = [SpinnerColumn(), TextColumn("{task.description}: {task.completed} re-tokenized"),
                              TimeElapsedColumn()]
        with Progress(*columns, console=Console(stderr=True), transient=as_json) as progress, \
                _stop_on_interrupt(stop):
            async with connection.client() as vault:
                return await _migrate(vault, epoch_number, batch_size, state_path, after, migrated, targets,
                                      progress, stop)

    try:
        total, targets = run_client(run())
    except KeyboardInterrupt:
        stop.set()
    if stop.is_set():
        click.echo(f"interrupted; run the same command again to resume (state file {state_path})", err=True)
        sys.exit(EXIT_INTERRUPTED)
    state_path.unlink(missing_ok=True)
    if as_json:
        click.echo(json.dumps({"epoch": epoch_number, "to_epoch": targets[-1], "to_epochs": targets,
                               "migrated": total}))
    elif len(targets) == 1:
        click.echo(f"migrated {total} tokens of epoch {epoch_number} to epoch {targets[0]}")
    else:
        names = ", ".join(map(str, targets))
        click.echo(f"migrated {total} tokens of epoch {epoch_number} to epochs {names} (the active epoch changed "
                   f"during the migration; migrate each but the last before destroying it)")
