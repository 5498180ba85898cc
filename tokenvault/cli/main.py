"""The `tokenvault` command: `serve` runs one node, `admin ...` operates a cluster.

Connection options are shared by every client command: `--url` (repeatable,
and/or comma-separated; env TOKENVAULT_URL), `--api-key` (env
TOKENVAULT_API_KEY), `--cluster-json` (env TOKENVAULT_CLUSTER_JSON), which
supplies the node URLs, the right key and the CA from a `cluster.json` written
by `run_cluster.sh`, and `--ca-file` (env TOKENVAULT_CA_FILE; else the file's
`ca_file`), the cluster CA that https:// nodes are verified against. Several
URLs are tried in turn, so commands keep working while a node is down.

Under `admin` the four connection options may also stand before the
subcommand, after any group on the way: `tokenvault admin --url U epoch
rotate` is `tokenvault admin epoch rotate --url U`. A value given after the
subcommand wins over one given before it; either wins over the environment.

`admin backup` downloads a verified backup of one node's store; `admin restore`
fills an empty node data directory from one (tokenvault.core.backup).

Exit codes: 0 success, 1 the service answered with an error (its problem+json
title and detail are shown), a backup was refused, `admin backup` or `audit
export` could not write its file (the partial file is removed), a confirmation
was answered no, or `admin epoch destroy --yes` found an unfinished migration of
or into the epoch (nothing was sent), 2 usage or configuration
error, 3 no node reachable, 4 `admin audit verify` (or `audit export`) found a
broken link, 5 `audit verify` or `audit export` stopped because a trim during
the walk dropped records it had not reached yet (nothing was found broken: run
it again), 130 `admin epoch migrate` stopped by Ctrl-C once the batch in flight
was done and its cursor saved (README, "Admin CLI and client library").
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import itertools
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from tokenvault.auth import ALL_SCOPES
from tokenvault.cli import lifecycle
from tokenvault.cli.connection import (EXIT_AUDIT_BROKEN, EXIT_SERVICE_ERROR, EXIT_UNREACHABLE, EXIT_USAGE,
                                              Connection, connection_options, fail, group_connection_options,
                                              run_client)
from tokenvault.client.vault import NoNodeAvailable, ProblemError, VaultError, printable_text
from tokenvault.crypto.keys import MAX_VALUE_BYTES

AUDIT_PAGE_RECORDS = 1000
MAX_ITEMS_PER_REQUEST = 1000
# A stdin line is read at most this many characters and its line end at a time: a value of MAX_VALUE_BYTES of
# UTF-8 (no node takes a longer one) has at most as many characters.
MAX_LINE_CHARS = MAX_VALUE_BYTES
# A request's items as they are sent (UTF-8 JSON strings, escapes included): half a node's default
# max_body_bytes.
MAX_BATCH_BYTES = 4 << 20
MAX_CELL_CHARS = 80
# The width of the console the tables print on where stdout is not a terminal: wider than any table, which
# takes only the width it needs.
PIPED_TABLE_WIDTH = 1 << 16


def _is_utf8(text: str) -> bool:
    """Whether ``text`` is valid UTF-8 as read: Python reads the bytes of a command line (and of stdin, as
    _LineBatches reads it) that are not UTF-8 as lone surrogates, which no request can carry."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class Utf8Text(click.ParamType[str]):
    """An argument or option sent to the vault as text: one that is not valid UTF-8 is a usage error (exit 2)
    that names the parameter and never shows the text (it may be a value, a token or a key)."""

    name = "text"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value)
        if not _is_utf8(text):
            self.fail("is not valid UTF-8 (it is not shown)", param, ctx)
        return text


UTF8_TEXT = Utf8Text()


def _cell(value: Any) -> Text:
    """A node's value as a table cell: plain text (a str cell is read as rich markup, so a node's "[...]"
    restyled or hid the table's text), each character that is not printable a '?' (an escape sequence
    drove the terminal), cut to MAX_CELL_CHARS."""
    if value is None:
        return Text("-")
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    text = printable_text(text, MAX_CELL_CHARS + 1)
    return Text(text if len(text) <= MAX_CELL_CHARS else text[: MAX_CELL_CHARS - 1] + "…")


def _table_console() -> Console:
    """The console a table prints on. Why a width where stdout is not a terminal (and COLUMNS is not set):
    rich then took 80 columns, or the width of a terminal on stdin, and cut cells short with "…", so a file
    or a program reading the table lost characters; a table takes only the width it needs."""
    piped = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    return Console(width=PIPED_TABLE_WIDTH if piped else None)


def _add_columns(table: Table, names: Iterable[str | Text]) -> None:
    """Why fold: on a terminal narrower than the table a cell goes on over more lines, where rich's default
    cut it short with "…"."""
    for name in names:
        table.add_column(name, overflow="fold")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def tokenvault() -> None:
    """TokenVault: a replicated vault of deterministic tokens."""


@tokenvault.command()
@click.option("--config", "config_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The node's TOML config file.")
def serve(config_path: str) -> None:
    """Run one node until SIGTERM or SIGINT."""
    from tokenvault.logs import enable_crash_stacks

    enable_crash_stacks()
    from tokenvault.config import ConfigError, load_config
    from tokenvault.crypto.keys import CryptoError
    from tokenvault.crypto.tls import TlsError, check_node_files

    try:
        # Why first: a bad config or certificate should be one clear line, before the node's modules load.
        config = load_config(config_path)
        if config.tls is not None:
            check_node_files(config.tls.files(), config.node_id)
        import uvloop

        # Why here: the event loop policy is a process-wide choice of the entry point, not of the library.
        uvloop.install()
        from tokenvault.serve import main as run_node

        exit_code = run_node(config_path)
    except (ConfigError, CryptoError, TlsError) as error:
        fail(str(error), EXIT_USAGE)
    sys.exit(exit_code)


@tokenvault.group()
@group_connection_options
def admin() -> None:
    """Administer a cluster (status, epochs, API keys, audit trail, backup and restore).

    The connection options may stand here, before the subcommand, or after it."""


async def _status(
        connection: Connection) -> tuple[list[tuple[str, dict[str, Any] | None, VaultError | None]], Any]:
    async with connection.client() as vault:
        async def probe(url: str) -> tuple[str, dict[str, Any] | None, VaultError | None]:
            try:
                return url, await vault.health(url), None
            except VaultError as error:
                return url, None, error

        rows = list(await asyncio.gather(*(probe(url) for url in connection.urls)))
        cluster: Any = None
        if connection.api_key and any(health is not None for _, health, _ in rows):
            try:
                cluster = await vault.cluster()
            except VaultError as error:
                cluster = error
        return rows, cluster


@admin.command()
@connection_options("admin")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def status(connection: Connection, as_json: bool) -> None:
    """Every node's role, view, commit and applied index and active epoch."""
    rows, cluster = run_client(_status(connection))
    if as_json:
        document = {"nodes": [{"url": url, "health": health, "error": None if error is None else str(error)}
                              for url, health, error in rows],
                    "cluster": cluster if isinstance(cluster, dict) else None}
        click.echo(json.dumps(document, indent=2))
    else:
        console = _table_console()
        table = Table(title="Nodes (GET /health)")
        _add_columns(table, ("url", "node", "role", "view", "primary", "commit", "applied", "epoch"))
        for url, health, error in rows:
            if health is None:
                table.add_row(url, "-", "[red]down[/red]", "-", "-", "-", "-", "-")
                continue
            table.add_row(url, *(_cell(health.get(field)) for field in
                                 ("node_id", "role", "view", "primary_id", "commit_index", "applied_index",
                                  "active_epoch")))
        console.print(table)
        for url, health, error in rows:
            if health is None:
                click.echo(_down_line(url, error), err=True)
        _print_cluster_view(console, cluster)
    if all(health is None for _, health, _ in rows):
        sys.exit(EXIT_UNREACHABLE)


def _down_line(url: str, error: VaultError | None) -> str:
    """The line on a node whose health could not be read, naming its URL once. Why: the error names it
    already (a NoNodeAvailable's failure is "URL: reason", a node's answer ends "(from URL)"), and the line
    put the URL before it, so that it said "URL: no node available: URL: reason"."""
    if isinstance(error, NoNodeAvailable):
        return f"{url}: " + "; ".join(failure.removeprefix(f"{url}: ") for failure in error.failures)
    if isinstance(error, ProblemError):
        return f"{url}: " + str(error).removesuffix(f" (from {error.url})")
    return f"{url}: {error}"


def _print_cluster_view(console: Console, cluster: Any) -> None:
    if cluster is None:
        return
    if isinstance(cluster, VaultError):
        click.echo(f"cluster view unavailable: {cluster}", err=True)
        return
    nodes = [node for node in cluster.get("nodes", []) if isinstance(node, dict)]
    columns: list[str] = []
    for node in nodes:
        columns.extend(key for key in node if key not in columns)
    table = Table(title="Cluster view (GET /v1/admin/cluster)")
    _add_columns(table, (_cell(column) for column in columns))
    for node in nodes:
        table.add_row(*(_cell(node.get(column)) for column in columns))
    console.print(table)


@admin.command("backup")
@connection_options("admin")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), metavar="FILE",
              help="Where to write the backup (first as FILE.partial, renamed once verified).")
@click.option("--prefer", type=click.Choice(["primary", "backup", "any"]), default="primary", show_default=True,
              help="Which node to take it from: the primary has everything acknowledged; a backup node "
                   "spares the primary but may be a little behind; any takes the URLs in order.")
@click.option("--read-timeout", "read_timeout_seconds", type=click.FloatRange(1, 3600), default=60.0,
              show_default=True, help="Give up when the stream stalls for this many seconds.")
@click.option("--force", is_flag=True, help="Overwrite FILE if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def admin_backup(connection: Connection, out_path: str, prefer: str, read_timeout_seconds: float, force: bool,
                 as_json: bool) -> None:
    """Download a consistent backup of one node's store while the cluster keeps serving.

    The stream is checked whole (manifest, every file's SHA-256, trailer) before FILE appears.
    """
    from tokenvault.cli.backup import download_backup
    from tokenvault.core.backup import BackupError

    report = (lambda message: None) if as_json else (lambda message: click.echo(message, err=True))
    try:
        result = run_client(download_backup(connection.urls, connection.api_key, Path(out_path), prefer=prefer,
                                      timeout_seconds=connection.timeout_seconds,
                                      retry_seconds=connection.retry_seconds,
                                      read_timeout_seconds=read_timeout_seconds, overwrite=force, report=report,
                                      ca_file=connection.ca_file))
    except BackupError as error:
        fail(str(error), EXIT_SERVICE_ERROR)
    document = {"file": str(result.path), "node_id": result.node_id, "role": result.role, "url": result.url,
                "index": result.index, "view": result.view, "bytes": result.size_bytes,
                "token_count": result.token_count, "seconds": round(result.seconds, 3),
                "shred_pending": result.pending_shred is not None,
                "shred_keys": None if result.pending_shred is None else result.pending_shred.key_count}
    if as_json:
        click.echo(json.dumps(document))
        return
    tokens = "" if result.token_count is None else f", {result.token_count} opaque tokens"
    click.echo(f"backup of {result.node_id} ({result.role}) at index {result.index}, view {result.view}: "
               f"{result.size_bytes} bytes{tokens} in {result.seconds:.1f} s, verified -> {result.path}")
    if result.pending_shred is not None:
        count = result.pending_shred.key_count
        rows = "" if count is None else f" (the rows of {count} keys it lists, which a node restored from it shreds first)"
        click.echo(f"it may hold the bytes of tokens deleted (or epochs destroyed) that the node had not shredded "
                   f"yet{rows}: keep it as you keep the values themselves")


@admin.command("restore")
@click.option("--backup", "backup_path", required=True, type=click.Path(dir_okay=False), metavar="FILE",
              help="A backup written by 'tokenvault admin backup'.")
@click.option("--config", "config_path", required=True, type=click.Path(exists=True, dir_okay=False),
              metavar="NODE_TOML", help="The config of the node whose (empty) data directory to fill.")
def admin_restore(backup_path: str, config_path: str) -> None:
    """Fill one node's empty data directory from a backup (offline: the node must not run).

    Verifies the whole backup and that the node's master key opens it, installs the store and starts
    the replication log after the backup's index. Restore every node of a new cluster this way (or use
    './run_cluster.sh restore FILE'), then start them.
    """
    from tokenvault.core.backup import BackupError, restore_data_dir, shred_scope
    from tokenvault.config import ConfigError, load_config

    try:
        config = load_config(config_path)
    except ConfigError as error:
        fail(str(error), EXIT_USAGE)
    try:
        restored = restore_data_dir(Path(backup_path), config)
    except BackupError as error:
        fail(str(error), EXIT_SERVICE_ERROR)
    click.echo(f"restored {restored.node_id} into {restored.data_dir}: index {restored.index}, view "
               f"{restored.view}, {restored.token_count} opaque tokens in {restored.epochs} epoch(s); start it with "
               f"'tokenvault serve --config {config_path}'")
    if restored.pending_shred is not None:
        click.echo(f"the backup may hold rows deleted and not yet shredded: the node's first shred pass compacts "
                   f"{shred_scope(restored.pending_shred)}")


@admin.group()
@group_connection_options
def epoch() -> None:
    """Rotate, list, migrate and destroy token epochs."""


@epoch.command("rotate")
@connection_options("admin")
@click.option("--idempotency-key", default=None, metavar="KEY", type=UTF8_TEXT,
              help="Makes a retried rotation return the first answer instead of rotating twice.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def epoch_rotate(connection: Connection, idempotency_key: str | None, as_json: bool) -> None:
    """Start a new epoch: new tokens are issued in it; old tokens stay detokenizable."""

    async def rotate() -> Any:
        async with connection.client() as vault:
            return await vault.rotate_epoch(idempotency_key)

    result = run_client(rotate())
    if as_json:
        click.echo(json.dumps({"epoch": result.epoch, "replayed": result.replayed}))
    elif result.replayed:
        click.echo(f"epoch {result.epoch} (replayed answer of the first request with this idempotency key)")
    else:
        click.echo(f"epoch {result.epoch} is now active")


@epoch.command("list")
@connection_options("admin")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def epoch_list(connection: Connection, as_json: bool) -> None:
    """List every epoch with its state and creation time."""

    async def fetch() -> Any:
        async with connection.client() as vault:
            return await vault.list_epochs()

    result = run_client(fetch())
    if as_json:
        epochs = [{"epoch": entry.epoch, "created_at": entry.created_at, "state": entry.state}
                  for entry in result.epochs]
        click.echo(json.dumps({"active_epoch": result.active_epoch, "epochs": epochs}, indent=2))
        return
    table = Table(title=f"Epochs (active: {result.active_epoch})")
    _add_columns(table, ("epoch", "state", "created_at"))
    for entry in result.epochs:
        table.add_row(str(entry.epoch), _cell(entry.state), _cell(entry.created_at))
    _table_console().print(table)


@admin.group("key")
@group_connection_options
def key_group() -> None:
    """Create, list and revoke runtime API keys (replicated to every node)."""


@key_group.command("create")
@connection_options("admin")
@click.option("--name", required=True, metavar="NAME", type=UTF8_TEXT,
              help="A label: 1-64 characters of [A-Za-z0-9_.-], starting with a letter or digit.")
@click.option("--scope", "scopes", required=True, multiple=True, metavar="SCOPE", type=UTF8_TEXT,
              help=f"A scope the key holds ({', '.join(sorted(ALL_SCOPES))}); repeat for several.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (with the key).")
def key_create(connection: Connection, name: str, scopes: tuple[str, ...], as_json: bool) -> None:
    """Create a key and print it once: no node stores it, only its salted hash."""

    async def create() -> Any:
        async with connection.client() as vault:
            return await vault.create_key(name, list(dict.fromkeys(scopes)))

    info = run_client(create())
    if not info.key or not info.key.isprintable():
        # Out of contract (a key is tvk_ and base64url): shown, it would drive the terminal or split its line.
        fail(f"the node answered a key that is not printable text (it is not shown): revoke key "
             f"{printable_text(info.id, 64)} ('tokenvault admin key revoke') and create one again", EXIT_SERVICE_ERROR)
    if as_json:
        click.echo(json.dumps({"id": info.id, "name": info.name, "scopes": list(info.scopes),
                               "created_at": info.created_at, "key": info.key}))
        return
    # The node's text reaches the terminal: each character that is not printable a '?'.
    described = printable_text(f"{info.id} ({info.name}; scopes: {', '.join(info.scopes)})", 1000)
    click.echo(f"created key {described}. It is shown only now; store it safely:", err=True)
    click.echo(info.key)


@key_group.command("list")
@connection_options("admin")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def key_list(connection: Connection, as_json: bool) -> None:
    """List the runtime keys (id, name, scopes, creation time; never a key)."""

    async def fetch() -> Any:
        async with connection.client() as vault:
            return await vault.list_keys()

    keys = run_client(fetch())
    if as_json:
        click.echo(json.dumps({"keys": [{"id": info.id, "name": info.name, "scopes": list(info.scopes),
                                         "created_at": info.created_at} for info in keys]}, indent=2))
        return
    table = Table(title=f"Runtime API keys ({len(keys)})")
    _add_columns(table, ("id", "name", "scopes", "created_at"))
    for info in keys:
        table.add_row(_cell(info.id), _cell(info.name), _cell(",".join(info.scopes)), _cell(info.created_at))
    _table_console().print(table)


@key_group.command("revoke")
@connection_options("admin")
@click.argument("key_id", type=UTF8_TEXT)
def key_revoke(connection: Connection, key_id: str) -> None:
    """Revoke the key KEY_ID: every node refuses it within a second of this command's success."""

    async def revoke() -> Any:
        async with connection.client() as vault:
            return await vault.revoke_key(key_id)

    result = run_client(revoke())
    click.echo(f"key {key_id} revoked" + (" (it was already gone: an earlier try, whose answer was lost, "
                                          "revoked it)" if result.already_gone else ""))


@admin.group("member")
@group_connection_options
def member_group() -> None:
    """List, add and remove cluster members, one at a time (docs/replication.md, "Membership")."""


@member_group.command("list")
@connection_options("admin")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def member_list(connection: Connection, as_json: bool) -> None:
    """The configuration in effect on the primary: each member's role (voter or learner) and progress."""

    async def fetch() -> Any:
        async with connection.client() as vault:
            return await vault.list_members()

    members = run_client(fetch())
    if as_json:
        click.echo(json.dumps(members, indent=2))
        return
    state = "committed" if members.get("committed") else "being committed"
    # Why a Text: the index is the node's, and a str title is read as rich markup.
    table = Table(title=Text("Members (configuration at index ") + _cell(members.get("configuration_index"))
                  + f", {state})")
    _add_columns(table, ("id", "role", "peer_addr", "match_index", "added_at_index"))
    for member in members["members"]:
        primary = " (primary)" if member.get("id") == members.get("primary_id") else ""
        table.add_row(_cell(member.get("id")) + primary, _cell(member.get("role")), _cell(member.get("peer_addr")),
                      _cell(member.get("match_index")), _cell(member.get("added_at_index")))
    _table_console().print(table)


def _member_wait_option(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--wait", "wait_seconds", type=click.FloatRange(1, 86400), default=300.0, show_default=True,
        help="Seconds to wait for the change to commit, retrying the refusals the cluster lifts by itself "
             "(another change still committing, the learner still catching up); past them it fails.")(command)


@member_group.command("add")
@connection_options("admin")
@click.argument("node_id", type=UTF8_TEXT)
@click.argument("peer_addr", type=UTF8_TEXT)
@click.option("--learner-only", is_flag=True, help="Add it as a learner and do not promote it.")
@_member_wait_option
def member_add(connection: Connection, node_id: str, peer_addr: str, learner_only: bool, wait_seconds: float) -> None:
    """Add NODE_ID (its peer listener at PEER_ADDR, host:port) as a learner, then promote it to voter once
    it has caught up. The node must be running (tokenvault serve with join = true in its config).

    A step the member list shows done and committed is skipped, so running it again is safe; an id that is
    a member at another address is refused (remove it first)."""

    async def add() -> bool:
        """Whether this call made a change: False when the member list showed every step done already."""
        async with connection.client() as vault:
            deadline = asyncio.get_running_loop().time() + wait_seconds
            added = await vault.change_member_once("add", node_id, peer_addr, deadline)
            if learner_only:
                return added
            # As AsyncClient.add_voter does, step by step, to say whether anything was done.
            return await vault.change_member_once("promote", node_id, None, deadline) or added

    role = "learner" if learner_only else "voter"
    if run_client(add()):
        click.echo(f"{node_id} added as a {role}")
    elif learner_only:
        click.echo(f"{node_id} is a member at {peer_addr} already (committed): nothing was added")
    else:
        click.echo(f"{node_id} is a voter at {peer_addr} already (committed): nothing was changed")


@member_group.command("remove")
@connection_options("admin")
@click.argument("node_id", type=UTF8_TEXT)
@_member_wait_option
def member_remove(connection: Connection, node_id: str, wait_seconds: float) -> None:
    """Remove NODE_ID (live or dead; the primary steps down once its own removal commits).

    It returns once the removal is committed; one the member list shows done and committed is not
    proposed again, so running it again is safe."""

    async def remove() -> Any:
        async with connection.client() as vault:
            deadline = asyncio.get_running_loop().time() + wait_seconds
            return await vault.change_member_once("remove", node_id, None, deadline)

    if run_client(remove()):
        click.echo(f"{node_id} removed")
    else:  # a typo, or a removal an earlier run made: say which it cannot be, never "removed"
        click.echo(f"{node_id} is not a member (committed): nothing was removed")


@admin.group("audit")
@group_connection_options
def audit_group() -> None:
    """Check the hash-chained audit trail."""


# `audit verify` and `audit export`: the trail was trimmed (its anchor moved past the last record verified)
# while the walk ran, or its anchor changed otherwise (pages from nodes at different points). Nothing was
# found broken; the walk cannot go on: run it again (README, "Exit codes").
EXIT_AUDIT_TRIMMED = 5


class _AuditWalk(NamedTuple):
    last_seq: int  # the trail's head as the last page named it
    broken: Any  # the first ChainBreak, or None
    # Set when the trail changed under the walk (a trim past what was verified): why, and the anchor now.
    changed: str | None = None
    anchor_now: int | None = None


async def _walk_audit(connection: Connection, verifier: Any, on_record: Callable[[dict[str, Any]], None]) -> _AuditWalk:
    """Page through the whole trail, checking each record in order, and, wherever the walk ends, that the
    last record checked is the head the node names (records cut off at the end are missing) and that a
    trim record among those checked names the anchor, if there is one (ChainVerifier.check_anchor).

    ``on_record`` sees every record that verified, in order, before the first broken one. The anchor is
    read on every page: a trim that commits during the walk moves it, and once it has moved past the
    last record verified the records between are gone (trimmed, not tampered with) and the walk stops."""
    from tokenvault.audit_chain import ChainBreak

    after = 0
    anchor: tuple[int, str] | None = None
    async with connection.client() as vault:
        while True:
            page = await vault.audit_page(after, AUDIT_PAGE_RECORDS)
            try:
                if after == 0:
                    anchor = page.anchor
                    if anchor is not None:
                        _start_at_anchor(verifier, anchor)
                elif page.anchor != anchor:
                    changed = _anchor_change(verifier, anchor, page.anchor)
                    if changed is not None:
                        return _AuditWalk(page.last_seq, None, changed, page.anchor[0] if page.anchor else None)
                    anchor = page.anchor  # a trim of records already verified: the rest still follows them
                for record in page.records:
                    verifier.check(record)
                    on_record(record)
                # A page with no next one ends the walk, and so does a next_after that does not move on
                # (older nodes answered a full last page with next_after set, then an empty page with
                # next_after = after): either way the last record checked must be the head.
                next_after = page.next_after
                if next_after is None or next_after <= after:
                    if verifier.last_seq != page.last_seq:
                        raise ChainBreak(verifier.last_seq + 1,
                                         f"is missing: the trail's head is record {page.last_seq}")
                    verifier.check_anchor(anchor[0] if anchor else 0)
                    return _AuditWalk(page.last_seq, None)
            except ChainBreak as broken:
                return _AuditWalk(page.last_seq, broken)
            after = next_after


def _anchor_change(verifier: Any, before: tuple[int, str] | None, now: tuple[int, str] | None) -> str | None:
    """Why the walk cannot go on now that the anchor is ``now`` (it was ``before``), or None when it can:
    a trim through a record already verified leaves the records after it linked as they were."""
    if now is not None and now[0] > (before[0] if before else 0):
        if now[0] <= verifier.last_seq:
            return None
        return (f"audit trail trimmed through record {now[0]} during the walk, past the last record verified "
                f"({verifier.last_seq}); nothing was found broken: run again")
    # No trim does this (the anchor only moves forward): the pages came from nodes at different points,
    # or the node changed under the walk.
    return (f"audit trail's anchor changed during the walk (record {before[0] if before else 0} to "
            f"{now[0] if now else 0}); nothing was found broken: run again against one node")


def _start_at_anchor(verifier: Any, anchor: tuple[int, str]) -> None:
    """A trimmed trail is checked from its anchor (the last record dropped): what came before it can be
    checked only in the export it was trimmed after."""
    from tokenvault.audit_chain import ChainBreak, parse_hash

    seq, digest = anchor
    try:
        verifier.start_at(seq, parse_hash(digest))
    except ValueError:
        raise ChainBreak(seq + 1, "the trail's anchor hash is malformed") from None


def _report_audit(verifier: Any, walk: _AuditWalk, as_json: bool, extra: dict[str, Any],
                  partial_note: str = "") -> None:
    """The summary, and the exit: 4 at a broken link, 5 when the trail was trimmed under the walk."""
    broken = walk.broken
    if as_json:
        summary = {"ok": broken is None and walk.changed is None, "verified": verifier.count,
                   "last_seq": walk.last_seq, "head_hash": verifier.previous_hash.hex(),
                   "anchor_seq": verifier.anchor_seq, "broken_seq": broken.seq if broken else None,
                   "reason": broken.reason if broken else walk.changed, **extra}
        if walk.changed is not None:
            summary["trimmed_through"] = walk.anchor_now
        click.echo(json.dumps(summary))
    elif walk.changed is not None:
        click.echo(f"{walk.changed} ({verifier.count} records verified){partial_note}", err=True)
    elif broken is None:
        since = f" after the anchor at record {verifier.anchor_seq}" if verifier.anchor_seq else ""
        click.echo(f"audit trail intact: {verifier.count} records{since}, head record {verifier.last_seq}, "
                   f"head {verifier.previous_hash.hex()}")
    else:
        click.echo(f"audit trail BROKEN at record {broken.seq}: {broken.reason} "
                   f"({verifier.count} records before it verified)", err=True)
    if broken is not None:
        sys.exit(EXIT_AUDIT_BROKEN)
    if walk.changed is not None:
        sys.exit(EXIT_AUDIT_TRIMMED)


@audit_group.command("verify")
@connection_options("admin")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def audit_verify(connection: Connection, as_json: bool) -> None:
    """Walk every page of the audit trail and check its hash chain, up to the head the node names; exit 4
    at the first broken link (records missing at the end included), 5 if a trim during the walk dropped
    records it had not reached yet (run it again)."""
    from tokenvault.audit_chain import ChainVerifier

    verifier = ChainVerifier()
    walk = run_client(_walk_audit(connection, verifier, lambda record: None))
    _report_audit(verifier, walk, as_json, {})


@audit_group.command("export")
@connection_options("admin")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), metavar="FILE",
              help="Where to write the records, one JSON object per line (mode 0600; never overwritten).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def audit_export(connection: Connection, out_path: str, as_json: bool) -> None:
    """Write the whole audit trail to FILE as JSON lines, verifying the chain on the way.

    Every line keeps its hashes, so the copy can be checked again later. Records after a broken
    link are not written and the command exits 4; a trim during the export that dropped records it
    had not reached yet stops it with exit 5 (FILE then holds only the records before: export again
    to another file). A FILE that cannot be written to its end (a full disk, an I/O error) is removed and
    the command exits 1, naming it and the system's reason."""
    from tokenvault.audit_chain import ChainVerifier

    try:
        descriptor = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as error:
        raise click.UsageError(f"cannot create {out_path!r}: {error.strerror}") from None
    verifier = ChainVerifier()
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            def write(record: dict[str, Any]) -> None:
                handle.write(json.dumps(record, separators=(",", ":"), sort_keys=True) + "\n")

            walk = run_client(_walk_audit(connection, verifier, write))
    except OSError as error:
        # A full disk or an I/O error, from a write during the walk or from the flush as the file closes
        # (run_client leaves OSError alone): the file holds part of the trail at most, so it goes, as a
        # backup's partial file does (tokenvault/cli/backup.py).
        _remove_unfinished_export(out_path, error)
    _report_audit(verifier, walk, as_json, {"file": out_path},
                  f"; {out_path} holds only those: export again to another file")


def _remove_unfinished_export(out_path: str, error: OSError) -> None:
    """Remove an export that could not be written and exit 1 naming the file and the system's reason."""
    reason = error.strerror or str(error)
    try:
        os.unlink(out_path)
    except FileNotFoundError:
        pass
    except OSError as removing:
        fail(f"cannot write {out_path!r}: {reason}; it holds only part of the trail and could not be removed "
             f"({removing.strerror or removing}): delete it, then export again", EXIT_SERVICE_ERROR)
    fail(f"cannot write {out_path!r}: {reason}; the partial file was removed: export again", EXIT_SERVICE_ERROR)


@audit_group.command("trim")
@connection_options("admin")
@click.option("--through", "through_seq", required=True, type=click.IntRange(1, 2**63 - 1), metavar="SEQ",
              help="The last record to drop: the head record of an export you keep.")
@click.option("--hash", "through_hash", required=True, metavar="HEX", type=UTF8_TEXT,
              help="That record's hash, as the export printed it (its head).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def audit_trim(connection: Connection, through_seq: int, through_hash: str, yes: bool, as_json: bool) -> None:
    """Drop the audit records up to SEQ on every node, keeping their hash as the chain's anchor.

    Export first (`audit export`), keep the file and its head hash, then trim through that head: the
    trim is refused (exit 1) unless record SEQ has exactly that hash. The trim itself is recorded."""
    through_hash = through_hash.strip().lower()
    if not yes:
        click.confirm(f"Drop audit records 1 to {through_seq} on every node? Only your export will hold them",
                      abort=True, err=True)

    async def trim() -> Any:
        async with connection.client() as vault:
            return await vault.trim_audit(through_seq, through_hash)

    result = run_client(trim())
    if as_json:
        click.echo(json.dumps({"trimmed_through": result.trimmed_through, "removed": result.removed,
                               "anchor_hash": result.anchor_hash}))
    else:
        click.echo(f"audit trail trimmed through record {result.trimmed_through} ({result.removed} records "
                   f"dropped); anchor {printable_text(result.anchor_hash, 200)}")


def _answered_note(what: str, answered: int) -> str:
    """What a command that stopped partway adds to its error: which of its inputs (``what``: lines, token
    arguments) were answered and printed, 1 to ``answered``; output line (or list item) N answers input N."""
    return f" ({what} 1 to {answered} were answered above)" if answered else ""


def _batched(items: Iterable[tuple[int, str]]) -> Iterator[tuple[list[str], int]]:
    """``items`` (each with its line or argument number) in the batches they are sent in, each with the number
    of its last item: at most MAX_ITEMS_PER_REQUEST items and MAX_BATCH_BYTES of them as the request carries
    them (UTF-8 JSON strings: a character is up to 4 bytes, a control character 6; one longer item goes
    alone), so a request's body stays under a node's default bound. Each batch is taken from ``items`` only
    when asked for."""
    batch: list[str] = []
    batch_bytes = last = 0
    for number, item in items:
        item_bytes = len(json.dumps(item, ensure_ascii=False).encode("utf-8")) - 2  # as sent, quotes aside
        if batch and (len(batch) == MAX_ITEMS_PER_REQUEST or batch_bytes + item_bytes > MAX_BATCH_BYTES):
            yield batch, last
            batch, batch_bytes = [], 0
        batch.append(item)
        batch_bytes += item_bytes
        last = number
    if batch:
        yield batch, last


class _LineBatches:
    """The items of a stream, one a line, in the batches they are sent in (_batched), each read only when
    asked for, so memory holds one batch whatever the size of the input. Each line is taken whole (a value
    of spaces is a value); empty lines at the end are dropped, one between two items is refused, since
    skipping it would pair every later output line with the wrong input line. A line longer than
    MAX_VALUE_BYTES of UTF-8 (no node takes a longer value; it is read at most MAX_LINE_CHARS and its line
    end at a time, and a line that read cuts is refused, never taken for a line and the rest for another) or
    not valid in the stream's encoding (UTF-8, unless the locale says otherwise) is refused by its number,
    never shown: it may be a card number.

    A refused line stops the command before the batch holding it is sent. The caller sets ``answered`` to
    the last line of each batch it has answered and printed, and the error names them, so output line N
    still answers input line N."""

    def __init__(self, source: Any, what: str) -> None:
        reconfigure = getattr(source, "reconfigure", None)
        if reconfigure is not None:
            # Why: bytes that do not decode become lone surrogates, found below with the number of their
            # line; a strict stream raises mid-read, in a block of lines, before the ones ahead are seen.
            reconfigure(errors="surrogateescape")
        self._source = source
        self._what = what
        self.answered = 0

    def __iter__(self) -> Iterator[tuple[list[str], int]]:
        """Each batch with the number of its last line."""
        return _batched(self._items())

    def _items(self) -> Iterator[tuple[int, str]]:
        first_empty: int | None = None  # the first of the empty lines read since the last item
        number = 0
        while line := self._source.readline(MAX_LINE_CHARS + 2):
            number += 1
            # Why: a line the read bound cut has more to come, even when what was read ends in carriage
            # returns, which the strip below would take for its line end.
            cut = len(line) == MAX_LINE_CHARS + 2 and not line.endswith("\n")
            item = line.rstrip("\r\n")
            if not _is_utf8(item):
                encoding = str(getattr(self._source, "encoding", None) or "utf-8")
                named = "UTF-8" if codecs.lookup(encoding).name == "utf-8" else encoding
                raise self._refuse(f"line {number} is not valid {named} (it is not shown): give one {self._what} "
                                   f"a line, in {named}")
            if cut or len(item.encode("utf-8")) > MAX_VALUE_BYTES:
                raise self._refuse(f"line {number} is longer than {MAX_VALUE_BYTES} bytes of UTF-8, more than any "
                                   f"value (it is not shown): give one {self._what} a line")
            if not item:
                first_empty = first_empty or number
                continue
            if first_empty is not None:
                raise self._refuse(f"line {first_empty} is empty: give one {self._what} a line, with no empty "
                                   "line between")
            yield number, item

    def _refuse(self, message: str) -> click.UsageError:
        return click.UsageError(message + _answered_note("lines", self.answered))


@tokenvault.command()
@connection_options("tokenizer")
@click.option("--idempotency-key", default=None, metavar="KEY", type=UTF8_TEXT,
              help="Idempotency key (single batch only).")
@click.option("--json", "as_json", is_flag=True, help="Print {epoch, tokens} JSON per batch.")
@click.option("--format", "token_format", type=click.Choice(["opaque", "card", "digits"]), default=None,
              help="Token format (default opaque); card and digits tokens carry no epoch: keep it (--json).")
@click.option("--ttl-seconds", type=click.IntRange(1, 315_360_000), default=None,
              help="Let the mappings expire after this many seconds.")
def tokenize(connection: Connection, idempotency_key: str | None, as_json: bool, token_format: str | None,
             ttl_seconds: int | None) -> None:
    """Tokenize values read from stdin, one per line; prints one token per line.

    Values are read from stdin only, so they never appear in a command line or shell history.
    """
    lines = _LineBatches(sys.stdin, "value")
    batches = iter(lines)
    first = next(batches, None)
    if first is None:
        raise click.UsageError("no values on stdin (one value per line)")
    if idempotency_key and next(batches, None) is not None:
        raise click.UsageError(f"--idempotency-key needs the values to fit one request: at most "
                               f"{MAX_ITEMS_PER_REQUEST} values and {MAX_BATCH_BYTES} bytes of them as sent "
                               "(UTF-8 JSON)")

    async def send() -> None:
        async with connection.client() as vault:
            for batch, last_line in itertools.chain([first], batches):
                result = await vault.tokenize(batch, idempotency_key, token_format=token_format,
                                              ttl_seconds=ttl_seconds)
                if as_json:
                    click.echo(json.dumps({"epoch": result.epoch, "tokens": list(result.tokens)}))
                else:
                    for token in result.tokens:
                        click.echo(token)
                lines.answered = last_line

    run_client(send(), lambda: _answered_note("lines", lines.answered))


@tokenvault.command()
@connection_options("detokenizer")
@click.argument("tokens", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list (null for unknown tokens).")
@click.option("--epoch", type=click.IntRange(1, 2**32 - 1), default=None,
              help="The epoch of card and digits tokens (default: the active one).")
def detokenize(connection: Connection, tokens: tuple[str, ...], as_json: bool, epoch: int | None) -> None:
    """Detokenize TOKENS (or tokens read from stdin, one per line); prints one value per line.

    An unknown token prints an empty line (null with --json) and a note on stderr. A failure partway
    names the tokens answered above; with --json their list is closed, so what was printed stays JSON.
    """
    position = next((number for number, token in enumerate(tokens, 1) if not _is_utf8(token)), None)
    if position is not None:
        raise click.UsageError(f"token argument {position} is not valid UTF-8 (it is not shown)")
    lines = None if tokens else _LineBatches(sys.stdin, "token")
    batches = iter(_batched(enumerate(tokens, 1)) if lines is None else lines)
    first = next(batches, None)
    if first is None:
        raise click.UsageError("no tokens given (arguments or stdin, one per line)")

    answered = 0  # the number of the last line or argument answered and printed

    async def send() -> tuple[int, int]:
        """Each batch printed once answered; the number of tokens and of unknown ones. With --json a failure
        after the list was opened closes it, so that what was printed stays valid JSON: the values of the
        tokens answered, in order (the error says which they are)."""
        nonlocal answered
        count = unknown = 0
        async with connection.client() as vault:
            try:
                for batch, last_number in itertools.chain([first], batches):
                    values = await vault.detokenize(batch, epoch=epoch)
                    if as_json:
                        # One JSON list, written a batch at a time.
                        items = ", ".join(json.dumps(value, ensure_ascii=False) for value in values)
                        click.echo(("[" if not count else ", ") + items, nl=False)
                    elif any(value is not None and ("\n" in value or "\r" in value) for value in values):
                        # One value a line cannot show it: every later line would be paired with the wrong token.
                        raise click.ClickException(f"a value holds a line break, which one value a line cannot "
                                                   f"show; nothing from token {count + 1} on was printed: run "
                                                   "again with --json")
                    else:
                        for value in values:
                            click.echo("" if value is None else value)
                    count += len(values)
                    unknown += sum(value is None for value in values)
                    answered = last_number
                    if lines is not None:
                        lines.answered = last_number
            except BaseException:
                if as_json and count:
                    with contextlib.suppress(OSError):  # stdout itself may be what failed
                        click.echo("]")
                raise
        if as_json:
            click.echo("]")
        return count, unknown

    what = "token arguments" if lines is None else "lines"
    count, unknown = run_client(send(), lambda: _answered_note(what, answered))
    if unknown:
        click.echo(f"{unknown} of {count} tokens are unknown", err=True)


epoch.add_command(lifecycle.epoch_destroy)
epoch.add_command(lifecycle.epoch_migrate)


def main() -> None:
    """Console-script entry point (`tokenvault`)."""
    tokenvault(prog_name="tokenvault")


if __name__ == "__main__":
    main()
