"""Command line of ./run_cluster.sh (`python -m tokenvault.devcluster COMMAND`).

Every command works on $TOKENVAULT_CLUSTER_DIR (default ./.cluster). Exit codes:
0 success, 1 the command could not be carried out (the message says why),
2 usage error.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any

import click

from tokenvault.devcluster import cluster, membership
from tokenvault.devcluster.cluster import ClusterError, ClusterSpec, NodeSpec, NodeStatus

NODE_COUNT_CHOICES = [str(count) for count in cluster.ALLOWED_NODE_COUNTS]

EXIT_FAILED = 1


def _handle_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(command)
    def wrapper(*arguments: Any, **options: Any) -> Any:
        try:
            return command(*arguments, **options)
        except ClusterError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(EXIT_FAILED)

    return wrapper


def _echo(message: str) -> None:
    click.echo(message)


def _print_started(spec: ClusterSpec, statuses: list[NodeStatus]) -> None:
    _echo(f"\nTokenVault cluster of {len(spec.nodes)} node(s) in {spec.directory}; "
          f"primary: {cluster.primary_of(statuses)}")
    for status in statuses:
        _echo("  " + status.describe())
    _echo(f"\nAPI keys (also in {spec.cluster_file}, mode 0600):")
    for info in spec.api_keys:
        _echo(f"  {info.name:<12} {info.key}  scopes: {', '.join(info.scopes)}")
    # Why: the demo changes the cluster it runs on; run without the variable, as suggested after a start or
    # restore in another directory, it ran on ./.cluster, another cluster.
    demo = cluster.run_cluster_command(spec.directory, "demo")
    if spec.ca_file is not None:
        _echo(f"\nCluster CA (clients verify nodes against it): {spec.ca_file}")
        _echo(f"Try: curl -s --cacert {spec.ca_file} {spec.nodes[0].http_url}/health   or   {demo}")
    else:
        _echo(f"\nTry: curl -s {spec.nodes[0].http_url}/health   or   {demo}")
        _warn_plain(spec)


def _warn_plain(spec: ClusterSpec) -> None:
    click.echo(f"warning: the cluster in {spec.directory} runs without TLS (generated with TOKENVAULT_TLS=false "
               f"or before TLS existed): API keys and values cross the network readable; for a TLS cluster, "
               f"stop it and generate a new cluster directory", err=True)


def _note_ignored_environment(spec: ClusterSpec) -> None:
    """Knobs only apply when a cluster is generated; say so instead of silently ignoring them."""
    base_port = os.environ.get("TOKENVAULT_BASE_PORT", "").strip()
    existing_base_port = spec.nodes[0].http_port - 1
    if base_port and base_port != str(existing_base_port):
        _echo(f"note: TOKENVAULT_BASE_PORT={base_port} is ignored: this existing cluster uses base port "
              f"{existing_base_port}")
    knobs = [name for name in cluster.ENVIRONMENT_KNOBS if os.environ.get(name)]
    if knobs:
        take = "takes" if len(knobs) == 1 else "take"
        _echo(f"note: {', '.join(knobs)} only {take} effect when a cluster is generated; this cluster keeps "
              f"its node.toml files")


def _node(node_id: str) -> NodeSpec:
    return cluster.load_cluster(cluster.default_cluster_directory()).node(node_id)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def run_cluster() -> None:
    """Run a local TokenVault cluster from $TOKENVAULT_CLUSTER_DIR (default ./.cluster)."""


@run_cluster.command()
@click.option("--nodes", type=click.Choice(NODE_COUNT_CHOICES), default=None,
              help="Number of nodes (default 3 for a new cluster; an existing cluster keeps its count).")
@click.option("--timeout-seconds", type=click.FloatRange(1, 3600), envvar="TOKENVAULT_START_TIMEOUT_S",
              default=cluster.DEFAULT_START_TIMEOUT_SECONDS, show_default=True, show_envvar=True,
              help="How long to wait for a primary.")
@_handle_errors
def start(nodes: str | None, timeout_seconds: float) -> None:
    """Create the cluster on first use, start its nodes, wait for a primary, print URLs and API keys."""
    directory = cluster.default_cluster_directory()
    if (directory / cluster.CLUSTER_FILE_NAME).exists():
        _note_ignored_environment(cluster.load_cluster(directory))
    spec, statuses = cluster.start_cluster(
        directory, int(nodes) if nodes else None, cluster.base_port_from_environment(),
        settings=cluster.settings_from_environment(), timeout_seconds=timeout_seconds, report=_echo)
    _print_started(spec, statuses)


@run_cluster.command()
@click.option("--timeout-seconds", type=click.FloatRange(0, 3600), envvar="TOKENVAULT_STOP_TIMEOUT_S",
              default=cluster.DEFAULT_STOP_TIMEOUT_SECONDS, show_default=True, show_envvar=True,
              help="How long to wait after SIGTERM before sending SIGKILL.")
@_handle_errors
def stop(timeout_seconds: float) -> None:
    """Stop every node gracefully (SIGTERM, then wait; SIGKILL after the timeout)."""
    cluster.stop_cluster(cluster.default_cluster_directory(), timeout_seconds, _echo)


@run_cluster.command()
@_handle_errors
def status() -> None:
    """One line per node: id, pid or "down", role, view, commit and applied index, active epoch."""
    spec = cluster.load_cluster(cluster.default_cluster_directory())
    for line in cluster.cluster_status(spec):
        _echo(line.describe())


@run_cluster.command()
@click.argument("node_id")
@_handle_errors
def kill(node_id: str) -> None:
    """SIGKILL one node (no graceful shutdown); returns once its workers and sealer are gone too."""
    cluster.kill_node(cluster.default_cluster_directory(), node_id, _echo)


@run_cluster.command()
@click.argument("node_id")
@click.option("--timeout-seconds", type=click.FloatRange(1, 3600), envvar="TOKENVAULT_START_TIMEOUT_S",
              default=cluster.DEFAULT_START_TIMEOUT_SECONDS, show_default=True, show_envvar=True,
              help="How long to wait until the node answers /health.")
@_handle_errors
def restart(node_id: str, timeout_seconds: float) -> None:
    """Start a stopped or killed node again with its existing data."""
    status = cluster.restart_node(cluster.default_cluster_directory(), node_id, timeout_seconds, _echo)
    _echo(status.describe())


@run_cluster.command("add-node")
@click.option("--timeout-seconds", type=click.FloatRange(1, 86400), default=membership.DEFAULT_CHANGE_TIMEOUT_SECONDS,
              show_default=True, help="How long to wait for the new node to catch up and be promoted.")
@_handle_errors
def add_node(timeout_seconds: float) -> None:
    """Create, start and add one node (next free id and ports); exits 0 once it is a voter."""
    node = membership.add_node(cluster.default_cluster_directory(), timeout_seconds, _echo)
    _echo(f"{node.node_id} added: {node.http_url}")


@run_cluster.command("remove-node")
@click.argument("node_id")
@click.option("--timeout-seconds", type=click.FloatRange(1, 86400), default=membership.DEFAULT_CHANGE_TIMEOUT_SECONDS,
              show_default=True, help="How long to wait until the removal can be made and commits.")
@_handle_errors
def remove_node(node_id: str, timeout_seconds: float) -> None:
    """Remove NODE_ID (live or dead) from the cluster and cluster.json; exits 0 once that is committed."""
    membership.remove_node(cluster.default_cluster_directory(), node_id, timeout_seconds, _echo)


@run_cluster.command()
@click.argument("node_id")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines (Ctrl-C to stop).")
@_handle_errors
def logs(node_id: str, follow: bool) -> None:
    """Print that node's log file (JSON lines), then its captured stdout/stderr if any."""
    node = _node(node_id)
    if not node.log_file.exists() and not node.output_file.exists():
        raise ClusterError(f"{node_id} has no log yet ({node.log_file})")
    if node.output_file.exists() and node.output_file.stat().st_size:
        click.echo(f"--- stdout/stderr of the process ({node.output_file}) ---", err=True)
        sys.stderr.flush()  # the line above first
        with open(node.output_file, "rb") as captured:  # streamed, never read whole
            shutil.copyfileobj(captured, sys.stderr.buffer)
        sys.stderr.buffer.flush()
        if node.log_file.exists():
            click.echo(f"--- node log ({node.log_file}) ---", err=True)
    if not node.log_file.exists():
        return
    output = sys.stdout.buffer
    with open(node.log_file, "rb") as handle:
        shutil.copyfileobj(handle, output)
        output.flush()
        try:
            while follow:
                chunk = handle.read(1 << 20)  # what was appended, a MiB at a time
                if chunk:
                    output.write(chunk)
                    output.flush()
                else:
                    time.sleep(0.2)
        except KeyboardInterrupt:
            return


@run_cluster.command()
@click.argument("backup_file", type=click.Path(dir_okay=False))
@click.option("--master-key-file", type=click.Path(dir_okay=False), default=None, metavar="PATH",
              help="The master.key of the cluster the backup was taken from (default: "
                   "$TOKENVAULT_KEY_DIR/master.key, else ./.cluster.keys/master.key).")
@click.option("--nodes", type=click.Choice(NODE_COUNT_CHOICES), default="3", show_default=True,
              help="Number of nodes of the new cluster.")
@click.option("--timeout-seconds", type=click.FloatRange(1, 3600), envvar="TOKENVAULT_START_TIMEOUT_S",
              default=cluster.DEFAULT_START_TIMEOUT_SECONDS, show_default=True, show_envvar=True,
              help="How long to wait for a primary.")
@_handle_errors
def restore(backup_file: str, master_key_file: str | None, nodes: str, timeout_seconds: float) -> None:
    """Build a NEW cluster in $TOKENVAULT_CLUSTER_DIR (which must not exist) from BACKUP_FILE and start it.

    Same master key as the backed-up cluster, new API keys and cluster secret; every node starts from
    the backup, so every token issued before it detokenizes. A truncated or altered backup is refused.
    """
    directory = cluster.default_cluster_directory()
    spec, statuses = cluster.restore_cluster(
        directory, backup_file, master_key_file or cluster.default_master_key_file(), int(nodes),
        cluster.base_port_from_environment(), settings=cluster.settings_from_environment(),
        timeout_seconds=timeout_seconds, report=_echo)
    _print_started(spec, statuses)


@run_cluster.command()
@_handle_errors
def demo() -> None:
    """Narrated, self-checking demo on the running cluster: concurrency, failover, recovery, epoch rotation,
    token lifecycle.

    Every node must be up. It changes the cluster: it rotates the epoch, then migrates the epoch that was
    active when it started into the new one and destroys it, so every token of that epoch (yours too)
    detokenizes to null afterwards; their values have new tokens in the new epoch.
    """
    from tokenvault.devcluster.demo import run_demo

    sys.exit(run_demo(cluster.load_cluster(cluster.default_cluster_directory()), _echo))


def main() -> None:
    run_cluster(prog_name="run_cluster.sh")
