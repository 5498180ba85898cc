"""The admin CLI's connection options (``--url``, ``--api-key``, ``--cluster-json``, ``--ca-file``,
given before or after the subcommand; tokenvault/cli/main.py tells the rules), its exit codes, and
how it runs a client call and turns client errors into messages and exit codes."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import click

from tokenvault.client.vault import (AsyncClient, ConfigurationError, NoNodeAvailable, ProblemError, ResponseError,
                                     VaultError, normalize_urls)
from tokenvault.smallfiles import MAX_CLUSTER_FILE_BYTES, FileTooLarge, read_small_file

EXIT_SERVICE_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_AUDIT_BROKEN = 4
# Where the admin groups keep the connection options given before the subcommand.
GROUP_OPTIONS_META_KEY = "tokenvault.group_connection_options"
CONNECTION_PARAMETERS = ("urls", "api_key", "cluster_json", "ca_file")

Result = TypeVar("Result")


@dataclass(frozen=True, slots=True)
class Connection:
    urls: tuple[str, ...]
    api_key: str | None
    timeout_seconds: float
    retry_seconds: float
    ca_file: str | None = None

    def client(self) -> AsyncClient:
        return AsyncClient(self.urls, self.api_key, timeout_seconds=self.timeout_seconds,
                           deadline_seconds=self.retry_seconds, ca_file=self.ca_file)


def fail(message: str, exit_code: int) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(exit_code)


def run_client(coroutine: Coroutine[Any, Any, Result], done_before: Callable[[], str] = lambda: "") -> Result:
    """Run a client coroutine and turn client errors into messages and exit codes. ``done_before`` gives
    what to add to the message of an error: what the command had done and printed before it (a command
    that answers its input a batch at a time stops partway)."""
    try:
        return asyncio.run(coroutine)
    except ProblemError as error:
        fail(str(error) + done_before(), EXIT_SERVICE_ERROR)
    except NoNodeAvailable as error:
        fail(str(error) + done_before(), EXIT_UNREACHABLE)
    except ConfigurationError as error:
        fail(str(error) + done_before(), EXIT_USAGE)
    except (ResponseError, VaultError) as error:
        fail(str(error) + done_before(), EXIT_SERVICE_ERROR)
    raise AssertionError("unreachable")


def _load_cluster_json(path: str) -> dict[str, Any]:
    try:
        document = json.loads(read_small_file(path, MAX_CLUSTER_FILE_BYTES))
    except OSError as error:
        raise click.UsageError(f"cannot read cluster file {path!r}: {error.strerror}") from None
    except FileTooLarge:
        raise click.UsageError(f"cluster file {path!r} is larger than {MAX_CLUSTER_FILE_BYTES} bytes") from None
    except (ValueError, RecursionError):
        # RecursionError: nesting deeper than the parser's stack, which 1 MiB of '[' is.
        raise click.UsageError(f"cluster file {path!r} is not valid JSON") from None
    if not isinstance(document, dict) or not isinstance(document.get("nodes"), list):
        raise click.UsageError(f"cluster file {path!r} has no 'nodes' list")
    if not isinstance(document.get("api_keys", {}), dict):
        raise click.UsageError(f"cluster file {path!r} has an 'api_keys' that is not an object")
    return document


def _resolve_connection(urls: tuple[str, ...], api_key: str | None, cluster_json: str | None,
                        key_name: str, timeout_seconds: float, retry_seconds: float,
                        ca_file: str | None = None) -> Connection:
    """Pick URLs (--url, TOKENVAULT_URL, then cluster.json), the key (--api-key/env, then cluster.json)
    and the CA that https:// nodes are verified against (--ca-file/env, then cluster.json's ca_file)."""
    document = _load_cluster_json(cluster_json) if cluster_json else None
    candidates: list[str] = list(urls)
    if not candidates and os.environ.get("TOKENVAULT_URL"):
        candidates = [os.environ["TOKENVAULT_URL"]]
    if not candidates and document is not None:
        candidates = [str(node.get("http_url", "")) for node in document["nodes"] if isinstance(node, dict)]
    if not candidates:
        raise click.UsageError("no node URL: pass --url, set TOKENVAULT_URL, or pass --cluster-json")
    if not api_key and document is not None:
        keys = document.get("api_keys", {})  # a dict: _load_cluster_json checked it
        entry = keys.get(key_name) or keys.get("full")
        if isinstance(entry, dict) and isinstance(entry.get("key"), str):
            api_key = entry["key"]
    if not ca_file and document is not None and isinstance(document.get("ca_file"), str):
        ca_file = document["ca_file"]
    try:
        return Connection(normalize_urls(candidates), api_key or None, timeout_seconds, retry_seconds,
                          ca_file or None)
    except ConfigurationError as error:
        raise click.UsageError(str(error)) from None


def _location_options(*, with_environment: bool) -> list[Callable[[Callable[..., Any]], Callable[..., Any]]]:
    """--url, --api-key, --cluster-json, --ca-file. Before the subcommand they carry no environment
    variable: the environment is read once, by the subcommand, so an explicit option always wins."""
    def environment(name: str) -> dict[str, Any]:
        return {"envvar": name, "show_envvar": True} if with_environment else {}

    return [
        click.option("--url", "urls", multiple=True, metavar="URL",
                     help="Node base URL; repeat or comma-separate for failover (env TOKENVAULT_URL)."),
        click.option("--api-key", metavar="KEY", help="API key sent as a Bearer token.",
                     **environment("TOKENVAULT_API_KEY")),
        click.option("--cluster-json", type=click.Path(dir_okay=False), metavar="FILE",
                     help="Take node URLs, the key and the CA file from this cluster.json.",
                     **environment("TOKENVAULT_CLUSTER_JSON")),
        click.option("--ca-file", type=click.Path(dir_okay=False), metavar="FILE",
                     help="CA certificate (PEM) to verify https nodes against.",
                     **environment("TOKENVAULT_CA_FILE")),
    ]


def group_connection_options(group: Callable[..., Any]) -> Callable[..., Any]:
    """Let an admin group take the connection options before its subcommand and hand them down."""

    @functools.wraps(group)
    def wrapper(**arguments: Any) -> Any:
        given = click.get_current_context().meta.setdefault(GROUP_OPTIONS_META_KEY, {})
        for name in CONNECTION_PARAMETERS:
            value = arguments.pop(name)
            if value:  # an inner group's value replaces an outer one's
                given[name] = value
        return group(**arguments)

    for decorate in reversed(_location_options(with_environment=False)):
        wrapper = decorate(wrapper)
    return wrapper


def _merge_group_options(arguments: dict[str, Any]) -> None:
    """Fill the connection options not given after the subcommand from those given before it."""
    context = click.get_current_context()
    given_before = context.meta.get(GROUP_OPTIONS_META_KEY, {})
    for name in CONNECTION_PARAMETERS:
        source = context.get_parameter_source(name)
        if source is click.core.ParameterSource.COMMANDLINE and arguments[name]:
            continue
        if name in given_before:
            arguments[name] = given_before[name]


def connection_options(key_name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator adding --url/--api-key/--cluster-json/--ca-file/--timeout and passing a `connection`."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        @click.option("--timeout", "timeout_seconds", type=click.FloatRange(0.1, 300), default=5.0,
                      show_default=True, help="Per-request timeout in seconds.")
        @click.option("--retry-seconds", type=click.FloatRange(0, 600), default=10.0, show_default=True,
                      help="Keep retrying unreachable or unavailable (503) nodes for this long.")
        @functools.wraps(command)
        def wrapper(timeout_seconds: float, retry_seconds: float, **arguments: Any) -> Any:
            _merge_group_options(arguments)
            connection = _resolve_connection(
                arguments.pop("urls"), arguments.pop("api_key"), arguments.pop("cluster_json"), key_name,
                timeout_seconds, retry_seconds, arguments.pop("ca_file"))
            return command(connection=connection, **arguments)

        for option in reversed(_location_options(with_environment=True)):
            wrapper = option(wrapper)
        return wrapper

    return decorate
