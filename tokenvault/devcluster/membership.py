"""./run_cluster.sh add-node and remove-node: one membership change of the dev cluster at a time.

add-node creates the next node (the next free id n<k> and the contract's ports
for it), issues its certificate from the cluster CA, writes its config with
``join = true`` (it starts as a learner of the current members), starts it, and
asks the cluster (the admin API, as ``tokenvault admin member add`` does) to add
it as a learner and to promote it once it has caught up. remove-node asks the
cluster to remove a node, live or dead, then stops it if it runs. Both return
once the change is committed (a change the member list shows but not committed
is waited for, never taken as done), and keep cluster.json in step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

from tokenvault.client.vault import AsyncClient, VaultError
from tokenvault.config import MemberConfig, TlsConfig, load_config, write_node_config
from tokenvault.crypto.tls import CA_CERT_FILE_NAME, CA_KEY_FILE_NAME, create_node_certificate
from tokenvault.devcluster.cluster import (DEFAULT_START_TIMEOUT_SECONDS, DEFAULT_STOP_TIMEOUT_SECONDS, Report,
                                           _locked, _silent, _wait, _wait_gone, launch_node, running_pid)
from tokenvault.devcluster.cluster_spec import (HOST, TLS_DIRECTORY_NAME, ClusterError, ClusterSpec, NodeSpec,
                                                _write_private_file, load_cluster, run_cluster_command)

DEFAULT_CHANGE_TIMEOUT_SECONDS = 300.0
_NODE_NUMBER = re.compile(r"n([0-9]{1,6})\Z")


def _number(node_id: str) -> int:
    match = _NODE_NUMBER.match(node_id)
    return int(match.group(1)) if match else 0


def _next_node(spec: ClusterSpec) -> NodeSpec:
    """n<k> with k past every id in cluster.json and every node directory (a removed node's data stays)."""
    used = [_number(node.node_id) for node in spec.nodes]
    used += [_number(path.name) for path in spec.directory.iterdir() if path.is_dir()]
    number = max(used) + 1
    # The contract's ports: node i serves HTTP on base + i and the peer protocol on base + 100 + i.
    first = spec.nodes[0]
    base_port = first.http_port - _number(first.node_id)
    scheme = "https" if spec.uses_tls else "http"
    directory = spec.directory / f"n{number}"
    return NodeSpec(node_id=f"n{number}", http_url=f"{scheme}://{HOST}:{base_port + number}",
                    peer_addr=f"{HOST}:{base_port + 100 + number}", data_dir=directory / "data",
                    log_file=directory / "node.log", pid_file=directory / "node.pid", config=directory / "node.toml")


def _write_joining_config(spec: ClusterSpec, node: NodeSpec) -> None:
    """The new node's config: a copy of a member's (keys, secrets, timing) with its own id, ports and
    certificate, the current members and itself as members, and join = true."""
    template = load_config(spec.nodes[0].config)
    tls = None
    if spec.uses_tls:
        tls_directory = spec.directory / TLS_DIRECTORY_NAME
        cert_file, key_file = tls_directory / f"{node.node_id}.crt", tls_directory / f"{node.node_id}.key"
        create_node_certificate(tls_directory / CA_CERT_FILE_NAME, tls_directory / CA_KEY_FILE_NAME, node.node_id,
                                [HOST], cert_file, key_file)
        tls = TlsConfig(cert_file=cert_file, key_file=key_file, ca_file=tls_directory / CA_CERT_FILE_NAME)
    members = tuple(MemberConfig(id=member.node_id, peer_addr=member.peer_addr, http_url=member.http_url)
                    for member in (*spec.nodes, node))
    config = dataclasses.replace(
        template, node_id=node.node_id, data_dir=node.data_dir, log_file=node.log_file, members=members,
        http=dataclasses.replace(template.http, host=HOST, port=node.http_port),
        peer=dataclasses.replace(template.peer, host=HOST, port=node.peer_port), tls=tls, join=True)
    node.directory.mkdir(mode=0o700)
    node.data_dir.mkdir(mode=0o700)
    write_node_config(node.config, config)


def _write_cluster_file(spec: ClusterSpec, nodes: tuple[NodeSpec, ...]) -> ClusterSpec:
    updated = dataclasses.replace(spec, nodes=nodes)
    _write_private_file(updated.cluster_file, json.dumps(updated.to_json(), indent=2) + "\n")
    return updated


def _client(spec: ClusterSpec, urls: tuple[str, ...], timeout_seconds: float) -> AsyncClient:
    return AsyncClient(urls, spec.key("admin"), ca_file=spec.ca_file, deadline_seconds=timeout_seconds)


def add_node(directory: Path | str, timeout_seconds: float = DEFAULT_CHANGE_TIMEOUT_SECONDS,
             report: Report = _silent) -> NodeSpec:
    """Create, start and add one node; returns once its promotion to voter is committed."""
    spec = load_cluster(directory)
    with _locked(spec.directory):
        node = _next_node(spec)
        _write_joining_config(spec, node)
        pid = launch_node(node, report)
        spec = _write_cluster_file(spec, (*spec.nodes, node))
    report(f"started {node.node_id} (pid {pid}) on {node.http_url}, peer {node.peer_addr}, as a joining learner")
    _wait(spec, [node.node_id], DEFAULT_START_TIMEOUT_SECONDS,
          lambda statuses: statuses[0].health is not None, f"{node.node_id} to answer /health")
    others = tuple(member.http_url for member in spec.nodes if member.node_id != node.node_id)

    async def join() -> dict[str, Any]:
        async with _client(spec, others, timeout_seconds) as vault:
            return await vault.add_voter(node.node_id, node.peer_addr, timeout_seconds)

    try:
        members = asyncio.run(join())
    except VaultError as error:
        remove = run_cluster_command(spec.directory, f"remove-node {node.node_id}")
        raise ClusterError(f"{node.node_id} runs (a learner, or not yet a member) but was not made a voter: "
                           f"{error}; '{remove}' takes it out") from None
    voters = [member["id"] for member in members["members"] if member.get("role") == "voter"]
    report(f"{node.node_id} caught up and is a voter (voters: {', '.join(voters)})")
    return node


def remove_node(directory: Path | str, node_id: str, timeout_seconds: float = DEFAULT_CHANGE_TIMEOUT_SECONDS,
                report: Report = _silent) -> None:
    """Remove a node (live or dead) from the configuration, then stop it and drop it from cluster.json."""
    spec = load_cluster(directory)
    node = spec.node(node_id)
    others = tuple(member.http_url for member in spec.nodes if member.node_id != node_id)
    if not others:
        raise ClusterError("the cluster's last node cannot be removed")

    async def remove() -> None:
        async with _client(spec, others, timeout_seconds) as vault:
            deadline = asyncio.get_running_loop().time() + timeout_seconds
            await vault.change_member_once("remove", node_id, None, deadline)

    try:
        asyncio.run(remove())
    except VaultError as error:
        # Not stopped nor dropped from cluster.json: a removal not committed yet may still be undone.
        raise ClusterError(f"{node_id} was not removed, or its removal is not committed yet: {error}; it is "
                           f"kept in cluster.json and not stopped: run remove-node {node_id} again") from None
    report(f"{node_id} removed from the configuration (committed)")
    with _locked(spec.directory):
        pid = running_pid(node)
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            if _wait_gone([(node, pid)], time.monotonic() + DEFAULT_STOP_TIMEOUT_SECONDS):
                os.kill(pid, signal.SIGKILL)
                _wait_gone([(node, pid)], time.monotonic() + 5.0)
            node.pid_file.unlink(missing_ok=True)
            report(f"stopped {node_id} (pid {pid}); its directory {node.directory} is kept")
        _write_cluster_file(spec, tuple(member for member in spec.nodes if member.node_id != node_id))
