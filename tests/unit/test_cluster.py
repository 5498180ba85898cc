"""Tests of tokenvault.devcluster.cluster: generation of the cluster directory and the process lifecycle.

The lifecycle tests start a stand-in node process (a few lines of stdlib Python
answering /health on the node's HTTP port) in place of `tokenvault serve`, so
they check what the cluster tool does (detached start, pid files, stale pid
detection, SIGTERM then SIGKILL, status) independently of the real node.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import shlex
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from tokenvault.devcluster import cluster
from tokenvault.devcluster import demo
from tokenvault.crypto import tls
from tokenvault.auth import hash_api_key
from tokenvault.devcluster.cluster import ClusterError, NodeSettings
from tokenvault.devcluster.cluster_cli import run_cluster
from tokenvault.config import SealerConfig, TimingConfig, WalConfig, load_config, write_node_config
from tokenvault.crypto.keys import MasterKey

FAKE_NODE_SOURCE = r"""
import json, os, signal, sys, threading, tomllib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
config = tomllib.load(open(sys.argv[sys.argv.index("--config") + 1], "rb"))
if os.environ.get("FAKE_NODE_EXIT"):
    print("fake node refuses to start", flush=True)
    sys.exit(3)
class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"status": "ok", "node_id": config["node_id"],
                           "role": "primary" if config["node_id"] == "n1" else "backup", "view": 1,
                           "primary_id": "n1", "commit_index": 5, "applied_index": 5,
                           "active_epoch": 1}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *arguments):
        pass
server = ThreadingHTTPServer((config["http"]["host"], config["http"]["port"]), Handler)
if "tls" in config:  # a TLS cluster: serve /health over HTTPS with the node's certificate, as the node does
    import ssl
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(config["tls"]["cert_file"], config["tls"]["key_file"])
    server.socket = context.wrap_socket(server.socket, server_side=True)
stop = threading.Event()
if os.environ.get("FAKE_NODE_IGNORE_SIGTERM"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
else:
    signal.signal(signal.SIGTERM, lambda number, frame: stop.set())
threading.Thread(target=server.serve_forever, daemon=True).start()
stop.wait()
"""


def free_port_pairs(count: int) -> list[tuple[int, int]]:
    sockets = [socket.socket() for _ in range(2 * count)]
    try:
        for probe in sockets:
            probe.bind(("127.0.0.1", 0))
        ports = [probe.getsockname()[1] for probe in sockets]
    finally:
        for probe in sockets:
            probe.close()
    return [(ports[2 * number], ports[2 * number + 1]) for number in range(count)]


@pytest.fixture
def fake_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cluster, "_serve_command",
                        lambda node: [sys.executable, "-c", FAKE_NODE_SOURCE, "serve", "--config", str(node.config)])
    monkeypatch.delenv("FAKE_NODE_EXIT", raising=False)
    monkeypatch.delenv("FAKE_NODE_IGNORE_SIGTERM", raising=False)


@pytest.fixture
def cluster_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.delenv("TOKENVAULT_KEY_DIR", raising=False)
    directory = tmp_path / "vault"
    yield directory
    if (directory / cluster.CLUSTER_FILE_NAME).exists():
        spec = cluster.load_cluster(directory)
        for node in spec.nodes:
            pid = cluster.running_pid(node)
            if pid is not None:
                os.kill(pid, 9)
                cluster._wait_gone([(node, pid)], cluster.time.monotonic() + 5)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_generation_writes_contract_cluster_json_with_absolute_paths_and_ports(cluster_directory: Path) -> None:
    spec, created = cluster.init_cluster(cluster_directory, 3, 9300)
    assert created
    document = json.loads((cluster_directory / "cluster.json").read_text())
    assert set(document) == {"nodes", "api_keys", "ca_file"}
    assert document["ca_file"] == str(cluster_directory / "tls" / "ca.crt") and Path(document["ca_file"]).is_file()
    assert [node["id"] for node in document["nodes"]] == ["n1", "n2", "n3"]
    for number, node in enumerate(document["nodes"], start=1):
        assert set(node) == {"id", "http_url", "peer_addr", "data_dir", "log_file", "pid_file", "config"}
        assert node["http_url"] == f"https://127.0.0.1:{9300 + number}"
        assert node["peer_addr"] == f"127.0.0.1:{9400 + number}"
        for key in ("data_dir", "log_file", "pid_file", "config"):
            assert Path(node[key]).is_absolute()
            assert Path(node[key]).parent.parent == cluster_directory or Path(node[key]).parent == \
                cluster_directory / f"n{number}"
        assert Path(node["data_dir"]).is_dir() and Path(node["config"]).is_file()
    scopes = {name: entry["scopes"] for name, entry in document["api_keys"].items()}
    assert scopes == {"admin": ["admin"], "tokenizer": ["tokenize"], "detokenizer": ["detokenize"],
                      "full": ["admin", "tokenize", "detokenize", "detokenize_masked", "delete", "retokenize"],
                      "masked": ["detokenize_masked"]}
    keys = [entry["key"] for entry in document["api_keys"].values()]
    assert len(set(keys)) == 5 and all(key.startswith("tvk_") and len(key) == 47 for key in keys)
    assert spec.to_json() == document


def key_file(cluster_directory: Path) -> Path:
    """Where a cluster generated without TOKENVAULT_KEY_DIR keeps its master key."""
    return cluster_directory.with_name(cluster_directory.name + ".keys") / "master.key"


def test_secrets_and_cluster_json_are_private(cluster_directory: Path) -> None:
    cluster.init_cluster(cluster_directory, 1, 9300)
    for path in (key_file(cluster_directory), *(cluster_directory / name for name in (
            "cluster.secret", "cluster.json", "n1/node.toml"))):
        assert mode_of(path) == 0o600, path
    for path in (key_file(cluster_directory), cluster_directory / "cluster.secret"):
        text = path.read_text().strip()
        assert len(text) == 64 and int(text, 16) >= 0
    assert key_file(cluster_directory).read_text() != (cluster_directory / "cluster.secret").read_text()
    assert mode_of(cluster_directory / "n1" / "data") == 0o700
    assert mode_of(key_file(cluster_directory).parent) == 0o700


def test_the_master_key_is_kept_outside_the_cluster_directory(cluster_directory: Path) -> None:
    """No file under the cluster directory holds the master key, in hex or raw."""
    spec, _ = cluster.init_cluster(cluster_directory, 3, 9300)
    key_hex = key_file(cluster_directory).read_text().strip()
    assert not (cluster_directory / "master.key").exists()
    files = [path for path in cluster_directory.rglob("*") if path.is_file()]
    assert len(files) >= 5
    for path in files:
        content = path.read_bytes()
        assert key_hex.encode() not in content.lower() and bytes.fromhex(key_hex) not in content, path
    assert cluster.master_key_file_of(spec) == key_file(cluster_directory)


def test_tokenvault_key_dir_names_the_key_directory_but_not_one_inside_the_cluster(
        cluster_directory: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENVAULT_KEY_DIR", str(cluster_directory / "keys"))
    with pytest.raises(ClusterError, match="inside the cluster directory"):
        cluster.init_cluster(cluster_directory, 1, 9300)
    assert not (cluster_directory / "cluster.json").exists()
    monkeypatch.setenv("TOKENVAULT_KEY_DIR", str(tmp_path / "elsewhere"))
    shutil.rmtree(cluster_directory)
    spec, _ = cluster.init_cluster(cluster_directory, 1, 9300)
    assert cluster.master_key_file_of(spec) == tmp_path / "elsewhere" / "master.key"
    assert mode_of(tmp_path / "elsewhere" / "master.key") == 0o600
    assert cluster.default_master_key_file() == tmp_path / "elsewhere" / "master.key"
    monkeypatch.delenv("TOKENVAULT_KEY_DIR")
    assert cluster.default_master_key_file() == Path.cwd() / ".cluster.keys" / "master.key"


def test_the_default_cluster_and_key_directories_are_ignored_by_git(monkeypatch: pytest.MonkeyPatch) -> None:
    """./run_cluster.sh start in a checkout writes the nodes' data to ./.cluster and the master key to
    ./.cluster.keys: a `git add -A` must pick up neither (a 2026-12-07 commit once took the key in)."""
    from tokenvault.devcluster.cluster_spec import default_cluster_directory, key_directory

    monkeypatch.delenv("TOKENVAULT_CLUSTER_DIR", raising=False)
    monkeypatch.delenv("TOKENVAULT_KEY_DIR", raising=False)
    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(root)
    ignored = (root / ".gitignore").read_text().splitlines()
    cluster_directory = default_cluster_directory({})
    for directory in (cluster_directory, key_directory(cluster_directory, {})):
        assert directory.parent == root and f"{directory.name}/" in ignored, directory


def test_what_readmes_backup_and_restore_write_in_the_checkout_is_ignored_by_git() -> None:
    """README's 'Backup and restore' writes vault.backup (and vault.backup.partial while it streams) and a
    restored cluster in .cluster-restored, with a copy of the master key in .cluster-restored.keys, all in
    the checkout: git showed them as files to add, the master key and a backup of every value among them."""
    root = Path(__file__).resolve().parents[2]
    readme = (root / "README.md").read_text()
    assert "--out vault.backup" in readme and "TOKENVAULT_CLUSTER_DIR=.cluster-restored " in readme
    ignored = (root / ".gitignore").read_text().splitlines()
    for written in ("vault.backup", "vault.backup.partial", ".cluster-restored/", ".cluster-restored.keys/"):
        assert any(fnmatch.fnmatch(written, pattern) for pattern in ignored), written


def test_a_key_directory_outlives_its_cluster_and_refuses_another_key(cluster_directory: Path) -> None:
    cluster.init_cluster(cluster_directory, 1, 9300)
    key_hex = key_file(cluster_directory).read_text()
    shutil.rmtree(cluster_directory)
    spec, created = cluster.init_cluster(cluster_directory, 1, 9300)
    assert created and key_file(cluster_directory).read_text() == key_hex
    shutil.rmtree(cluster_directory)
    with pytest.raises(ClusterError, match="already holds another master key"):
        cluster.init_cluster(cluster_directory, 1, 9300, master_key=MasterKey.generate())
    assert key_file(cluster_directory).read_text() == key_hex
    shutil.rmtree(cluster_directory)
    os.chmod(key_file(cluster_directory), 0o644)
    with pytest.raises(ClusterError, match="cannot use the existing master key .*chmod 600") as raised:
        cluster.init_cluster(cluster_directory, 1, 9300)
    assert key_hex.strip() not in str(raised.value)


def test_start_refuses_a_cluster_whose_key_file_is_gone_before_starting_any_node(cluster_directory: Path) -> None:
    spec, _ = cluster.init_cluster(cluster_directory, 1, 9300)
    key_file(cluster_directory).unlink()
    with pytest.raises(ClusterError, match=f"master key file of this cluster, {key_file(cluster_directory)}, "
                                           f"does not exist"):
        cluster.start_cluster(cluster_directory)
    assert cluster.running_pid(spec.nodes[0]) is None


def test_a_cluster_with_its_key_inside_still_starts_with_a_warning(cluster_directory: Path) -> None:
    """A cluster generated before the key directory: its configs name <cluster dir>/master.key."""
    spec, _ = cluster.init_cluster(cluster_directory, 1, 9300)
    inside = cluster_directory / "master.key"
    key_file(cluster_directory).rename(inside)
    config = load_config(spec.nodes[0].config)
    write_node_config(spec.nodes[0].config, dataclasses.replace(config, master_key_file=inside))
    lines: list[str] = []
    cluster._check_master_key_file(spec, lines.append)
    assert len(lines) == 1 and lines[0].startswith("warning: the master key") and str(inside) in lines[0]
    assert str(key_file(cluster_directory).parent) in lines[0]
    lines.clear()
    cluster._check_master_key_file(cluster.load_cluster(cluster_directory), lines.append)
    load_config(spec.nodes[0].config).load_master_key(environ={})  # and the node can load it


def test_node_configs_hold_only_hashes_and_load(cluster_directory: Path) -> None:
    spec, _ = cluster.init_cluster(cluster_directory, 3, 9300)
    all_salts: list[str | None] = []
    for node in spec.nodes:
        text = node.config.read_text()
        config = load_config(node.config)
        for info in spec.api_keys:
            # Salted: neither the key nor its plain SHA-256 is in the file, and no two entries
            # (nor the same key in two nodes' configs) share a salt.
            assert info.key not in text
            assert hash_api_key(info.key) not in text
        salts = [entry.salt for entry in config.api_keys]
        assert all(salt is not None and f'salt = "{salt}"' in text for salt in salts)
        all_salts.extend(salts)
        assert config.node_id == node.node_id
        assert config.http.port == node.http_port and config.peer.port == node.peer_port
        assert config.member_ids == ("n1", "n2", "n3")
        assert config.data_dir == node.data_dir and config.log_file == node.log_file
        assert config.master_key_file == key_file(cluster_directory)
        assert config.cluster_secret_file == cluster_directory / "cluster.secret"
        assert config.api_key_table().authenticate(spec.key("tokenizer")).scopes == frozenset({"tokenize"})
        assert config.load_cluster_secret() == bytes.fromhex((cluster_directory / "cluster.secret").read_text())
    assert len(set(all_salts)) == len(all_salts) == 3 * len(spec.api_keys)


def test_tls_by_default_a_ca_and_one_certificate_per_node(cluster_directory: Path) -> None:
    spec, _ = cluster.init_cluster(cluster_directory, 3, 9300)
    assert spec.ca_file == cluster_directory / "tls" / "ca.crt" and spec.uses_tls
    assert mode_of(cluster_directory / "tls") == 0o700
    for node in spec.nodes:
        config = load_config(node.config)
        assert config.tls is not None and config.tls.ca_file == spec.ca_file
        assert mode_of(config.tls.key_file) == 0o600
        # The certificate is signed by the cluster CA, names the node id and its host.
        certificate = tls.check_node_files(config.tls.files(), node.node_id)
        assert tls.certificate_node_ids(certificate) == (node.node_id,)
        assert all(member.http_url.startswith("https://") for member in config.members)
    assert mode_of(cluster_directory / "tls" / "ca.key") == 0o600


def test_tls_false_makes_a_plain_cluster(cluster_directory: Path) -> None:
    settings = cluster.settings_from_environment({"TOKENVAULT_TLS": "false"})
    assert settings.tls is False
    spec, _ = cluster.init_cluster(cluster_directory, 3, 9300, settings=settings)
    document = json.loads((cluster_directory / "cluster.json").read_text())
    assert document["ca_file"] is None and spec.ca_file is None
    assert all(node["http_url"].startswith("http://") for node in document["nodes"])
    assert not (cluster_directory / "tls").exists()
    assert all(load_config(node.config).tls is None for node in spec.nodes)


def test_a_cluster_json_from_before_tls_loads_as_plain(cluster_directory: Path) -> None:
    spec, _ = cluster.init_cluster(cluster_directory, 1, 9300, settings=NodeSettings(tls=False))
    document = json.loads((cluster_directory / "cluster.json").read_text())
    del document["ca_file"]
    (cluster_directory / "cluster.json").write_text(json.dumps(document))
    again = cluster.load_cluster(cluster_directory)
    assert again.ca_file is None and again.nodes == spec.nodes


def test_a_plain_cluster_is_warned_about_at_start(fake_serve: None, cluster_directory: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    ports = free_port_pairs(1)
    cluster.init_cluster(cluster_directory, 1, ports=ports, settings=NodeSettings(tls=False))
    monkeypatch.setenv("TOKENVAULT_CLUSTER_DIR", str(cluster_directory))
    result = CliRunner().invoke(run_cluster, ["start", "--timeout-seconds", "20"])
    assert result.exit_code == 0, result.output
    assert "warning: the cluster in" in result.output and "without TLS" in result.output
    cluster.stop_cluster(cluster_directory, 5)


def test_the_demo_start_suggests_names_the_cluster_it_started(
        fake_serve: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """start (and restore) end with 'Try: ... or ./run_cluster.sh demo'. For a cluster outside ./.cluster,
    as README's restore makes (TOKENVAULT_CLUSTER_DIR=.cluster-restored for that one command), the demo as
    suggested ran on ./.cluster instead, another cluster, whose active epoch it migrates and destroys. The
    suggestion now names a directory other than the default."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TOKENVAULT_KEY_DIR", raising=False)
    elsewhere = tmp_path / "restored dir"
    cluster.init_cluster(elsewhere, 1, ports=free_port_pairs(1))
    monkeypatch.setenv("TOKENVAULT_CLUSTER_DIR", str(elsewhere))
    try:
        result = CliRunner().invoke(run_cluster, ["start", "--timeout-seconds", "20"])
    finally:
        cluster.stop_cluster(elsewhere, 5)
    assert result.exit_code == 0, result.output
    assert f"or   TOKENVAULT_CLUSTER_DIR='{elsewhere}' ./run_cluster.sh demo\n" in result.output, result.output
    cluster.init_cluster(tmp_path / ".cluster", 1, ports=free_port_pairs(1))
    monkeypatch.delenv("TOKENVAULT_CLUSTER_DIR")
    try:
        result = CliRunner().invoke(run_cluster, ["start", "--timeout-seconds", "20"])
    finally:
        cluster.stop_cluster(tmp_path / ".cluster", 5)
    assert result.exit_code == 0, result.output
    assert "/health   or   ./run_cluster.sh demo\n" in result.output, result.output


def test_knobs_an_existing_cluster_ignores_are_named_in_a_sentence_that_agrees_with_their_number(
        cluster_directory: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from tokenvault.devcluster import cluster_cli

    spec, _ = cluster.init_cluster(cluster_directory, 1, 9300)
    for name in cluster.ENVIRONMENT_KNOBS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TOKENVAULT_TICK_MS", "20")
    cluster_cli._note_ignored_environment(spec)
    assert "note: TOKENVAULT_TICK_MS only takes effect when a cluster is generated" in capsys.readouterr().out
    monkeypatch.setenv("TOKENVAULT_LOG_LEVEL", "debug")
    cluster_cli._note_ignored_environment(spec)
    assert " only take effect when a cluster is generated" in capsys.readouterr().out


def test_second_init_keeps_keys_and_refuses_another_node_count(cluster_directory: Path) -> None:
    first, _ = cluster.init_cluster(cluster_directory, 3, 9300)
    master_key = key_file(cluster_directory).read_text()
    again, created = cluster.init_cluster(cluster_directory, 3, 9500)
    assert not created
    assert again == first
    assert key_file(cluster_directory).read_text() == master_key
    with pytest.raises(ClusterError, match="has 3 node\\(s\\), not 5"):
        cluster.init_cluster(cluster_directory, 5, 9300)


@pytest.mark.parametrize("count", [0, 2, 4, 8, 10, 11])
def test_only_an_odd_count_of_nodes_up_to_9(cluster_directory: Path, count: int) -> None:
    with pytest.raises(ClusterError, match="odd, from 1 to 9"):
        cluster.init_cluster(cluster_directory, count, 9300)


def test_seven_and_nine_node_clusters_are_made_with_a_port_pair_each(tmp_path: Path) -> None:
    for count in (7, 9):
        spec, created = cluster.init_cluster(tmp_path / f"c{count}", count, 9300)
        assert created and [node.node_id for node in spec.nodes] == [f"n{number}" for number in range(1, count + 1)]
        assert len({node.http_port for node in spec.nodes} | {node.peer_port for node in spec.nodes}) == 2 * count
    result = CliRunner().invoke(run_cluster, ["start", "--nodes", "8"])
    assert result.exit_code == 2 and "'8' is not one of '1', '3', '5', '7', '9'" in result.output


def test_non_empty_directory_without_cluster_json_is_refused(cluster_directory: Path) -> None:
    cluster_directory.mkdir()
    (cluster_directory / "master.key").write_text("x")
    with pytest.raises(ClusterError, match="no cluster.json"):
        cluster.init_cluster(cluster_directory, 1, 9300)


def test_environment_knobs_reach_the_node_configs(cluster_directory: Path) -> None:
    environment = {"TOKENVAULT_TICK_MS": "10", "TOKENVAULT_ELECTION_TIMEOUT_TICKS": "8",
                   "TOKENVAULT_HEARTBEAT_INTERVAL_TICKS": "1", "TOKENVAULT_REQUEST_TIMEOUT_MS": "900",
                   "TOKENVAULT_WAL_FSYNC": "false", "TOKENVAULT_LOG_LEVEL": "debug", "TOKENVAULT_SEALER": "false"}
    settings = cluster.settings_from_environment(environment)
    assert settings == NodeSettings("debug", TimingConfig(10, 8, 1, 900), WalConfig(fsync=False),
                                    SealerConfig(enabled=False), tls=True)
    spec, _ = cluster.init_cluster(cluster_directory, 1, 9300, settings=settings)
    config = load_config(spec.nodes[0].config)
    assert config.timing == TimingConfig(10, 8, 1, 900)
    assert config.wal.fsync is False and config.log_level == "debug" and config.sealer.enabled is False
    assert cluster.settings_from_environment({}).sealer.enabled is True


def test_every_knob_read_when_a_cluster_is_generated_is_one_start_notes_as_ignored() -> None:
    """`start` on an existing cluster names the knobs it ignored (ENVIRONMENT_KNOBS): each one that
    settings_from_environment reads must be there, or it would be ignored without a word."""
    read: set[str] = set()

    class Recording(dict[str, str]):
        def get(self, name: str, default: object = None) -> object:  # type: ignore[override]
            read.add(name)
            return super().get(name, default)

        def __getitem__(self, name: str) -> str:
            read.add(name)
            return super().__getitem__(name)

        def __contains__(self, name: object) -> bool:
            read.add(str(name))
            return super().__contains__(name)

    cluster.settings_from_environment(Recording())
    assert read and read <= set(cluster.ENVIRONMENT_KNOBS), read - set(cluster.ENVIRONMENT_KNOBS)


@pytest.mark.parametrize("environment", [{"TOKENVAULT_TICK_MS": "fast"}, {"TOKENVAULT_TICK_MS": "0"},
                                         {"TOKENVAULT_WAL_FSYNC": "maybe"}, {"TOKENVAULT_LOG_LEVEL": "loud"},
                                         {"TOKENVAULT_SEALER": "yes"}, {"TOKENVAULT_TLS": "off"},
                                         {"TOKENVAULT_ELECTION_TIMEOUT_TICKS": "4",
                                          "TOKENVAULT_HEARTBEAT_INTERVAL_TICKS": "9"},
                                         # str.isdigit is true of these, and int() raised ValueError (a traceback)
                                         # on the first two and read the third as 3 (checked on the code before).
                                         {"TOKENVAULT_TICK_MS": "\u00b2"}, {"TOKENVAULT_REQUEST_TIMEOUT_MS": "9" * 5000},
                                         {"TOKENVAULT_HTTP_WORKERS": "\u0663"}])
def test_bad_environment_knobs_are_clear_errors(environment: dict[str, str]) -> None:
    with pytest.raises(ClusterError):
        cluster.settings_from_environment(environment)


def test_directory_and_base_port_defaults() -> None:
    assert cluster.default_cluster_directory({}) == Path.cwd() / ".cluster"
    assert cluster.default_cluster_directory({"TOKENVAULT_CLUSTER_DIR": "rel/dir"}) == Path.cwd() / "rel/dir"
    assert cluster.base_port_from_environment({}) == 8100
    assert cluster.base_port_from_environment({"TOKENVAULT_BASE_PORT": "9000"}) == 9000
    for text in ("65500", "\u00b2", "9" * 5000, "\u0663"):  # the last three: see the knobs' test above
        with pytest.raises(ClusterError):
            cluster.base_port_from_environment({"TOKENVAULT_BASE_PORT": text})


def test_lifecycle_start_status_kill_restart_stop(fake_serve: None, cluster_directory: Path) -> None:
    messages: list[str] = []
    spec, statuses = cluster.start_cluster(cluster_directory, 3, ports=free_port_pairs(3), timeout_seconds=20,
                                           report=messages.append)
    assert cluster.primary_of(statuses) == "n1"
    assert all(status.pid is not None and status.field("role") for status in statuses)
    for node in spec.nodes:
        assert int(node.pid_file.read_text()) == cluster.running_pid(node)
    first_line = statuses[0].describe()
    assert first_line.startswith("n1") and "primary" in first_line and "commit 5" in first_line
    killed_pid = cluster.kill_node(cluster_directory, "n2", messages.append)
    after_kill = {status.node_id: status for status in cluster.cluster_status(spec)}
    assert after_kill["n2"].pid is None and after_kill["n2"].describe().split() == ["n2", "down"]
    assert not spec.node("n2").pid_file.exists()
    restarted = cluster.restart_node(cluster_directory, "n2", 20, messages.append)
    assert restarted.pid not in (None, killed_pid) and restarted.field("role") == "backup"
    again, _ = cluster.start_cluster(cluster_directory, timeout_seconds=20, report=messages.append)
    assert again == spec
    assert sum("already running" in message for message in messages) == 3
    stopped = cluster.stop_cluster(cluster_directory, 10, messages.append)
    assert stopped == ["n1", "n2", "n3"]
    assert all(status.pid is None and status.health is None for status in cluster.cluster_status(spec))
    assert not any("sending SIGKILL" in message for message in messages)


def test_stale_pid_file_of_another_process_is_detected_and_replaced(
        fake_serve: None, cluster_directory: Path) -> None:
    spec, _ = cluster.init_cluster(cluster_directory, 1, ports=free_port_pairs(1))
    node = spec.nodes[0]
    node.pid_file.write_text(f"{os.getpid()}\n")
    assert cluster.running_pid(node) is None
    messages: list[str] = []
    status = cluster.restart_node(cluster_directory, "n1", 20, messages.append)
    assert status.pid != os.getpid() and status.health is not None
    assert any("stale pid file" in message for message in messages)
    cluster.stop_cluster(cluster_directory, 10)
    node.pid_file.write_text(f"{os.getpid()}\n")
    with pytest.raises(ClusterError, match="not running"):
        cluster.kill_node(cluster_directory, "n1")
    assert not node.pid_file.exists()


def test_stop_escalates_to_sigkill_and_says_so(fake_serve: None, cluster_directory: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_NODE_IGNORE_SIGTERM", "1")
    spec, _ = cluster.start_cluster(cluster_directory, 1, ports=free_port_pairs(1), timeout_seconds=20)
    messages: list[str] = []
    cluster.stop_cluster(cluster_directory, 0.3, messages.append)
    assert any("did not stop within 0.3 s: sending SIGKILL" in message for message in messages)
    assert cluster.running_pid(spec.nodes[0]) is None


def test_a_node_that_exits_at_start_fails_fast_with_its_output(
        fake_serve: None, cluster_directory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_NODE_EXIT", "1")
    with pytest.raises(ClusterError) as caught:
        cluster.start_cluster(cluster_directory, 1, ports=free_port_pairs(1), timeout_seconds=20)
    assert "exited" in str(caught.value) and "fake node refuses to start" in str(caught.value)


def test_port_in_use_is_reported_before_launching(fake_serve: None, cluster_directory: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy_port = holder.getsockname()[1]
        with pytest.raises(ClusterError, match=f"port {busy_port} is already in use"):
            cluster.start_cluster(cluster_directory, 1, ports=[(busy_port, free_port_pairs(1)[0][1])],
                                  timeout_seconds=5)
    assert not (cluster_directory / "n1" / "node.pid").exists()


def test_a_new_cluster_whose_ports_are_in_use_is_not_generated(fake_serve: None, cluster_directory: Path) -> None:
    """A cluster keeps the ports it was generated with: one generated on a busy port could never start, and
    TOKENVAULT_BASE_PORT (read only when a cluster is generated) could not move it. The first start
    refuses before it writes anything, so the same start with free ports follows."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy_port = holder.getsockname()[1]
        with pytest.raises(ClusterError, match=f"port {busy_port} is already in use") as refused:
            cluster.start_cluster(cluster_directory, 1, ports=[(free_port_pairs(1)[0][0], busy_port)],
                                  timeout_seconds=5)
    assert not (cluster_directory / cluster.CLUSTER_FILE_NAME).exists()
    assert not cluster.key_directory(cluster_directory).exists()
    assert "no cluster was generated" in str(refused.value) and "TOKENVAULT_BASE_PORT" in str(refused.value)
    free = free_port_pairs(1)
    spec, statuses = cluster.start_cluster(cluster_directory, 1, ports=free, timeout_seconds=20)
    assert (spec.nodes[0].http_port, spec.nodes[0].peer_port) == free[0]
    assert cluster.primary_of(statuses) == "n1"


def test_a_port_in_use_on_an_existing_cluster_is_refused_before_any_node_starts(
        fake_serve: None, cluster_directory: Path) -> None:
    """Each node's ports were checked only as it was launched: with n2's peer port taken, start launched n1,
    then stopped with exit 1 at n2, leaving n1 running, n3 not started and nothing said of either. Every
    port of the nodes to start is now checked first, so a refused start starts nothing."""
    ports = free_port_pairs(3)
    spec, _ = cluster.init_cluster(cluster_directory, 3, ports=ports)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", ports[1][1]))
        holder.listen()
        with pytest.raises(ClusterError, match=f"n2: peer port {ports[1][1]} is already in use"):
            cluster.start_cluster(cluster_directory, timeout_seconds=5)
    assert [cluster.running_pid(node) for node in spec.nodes] == [None, None, None]
    spec, statuses = cluster.start_cluster(cluster_directory, timeout_seconds=20)
    assert cluster.primary_of(statuses) == "n1"


def test_command_line_status_logs_and_errors(fake_serve: None, cluster_directory: Path) -> None:
    spec, _ = cluster.start_cluster(cluster_directory, 1, ports=free_port_pairs(1), timeout_seconds=20)
    spec.nodes[0].log_file.write_text('{"event": "node.started"}\n')
    runner = CliRunner()
    environment = {"TOKENVAULT_CLUSTER_DIR": str(cluster_directory)}
    status = runner.invoke(run_cluster, ["status"], env=environment)
    assert status.exit_code == 0, status.output
    assert status.stdout.startswith("n1") and "primary" in status.stdout
    logs = runner.invoke(run_cluster, ["logs", "n1"], env=environment)
    assert logs.exit_code == 0 and '"node.started"' in logs.stdout
    # The process's captured stdout/stderr comes first, on stderr, after a line that names it.
    spec.nodes[0].output_file.write_bytes(b"a traceback, say\n")
    logs = runner.invoke(run_cluster, ["logs", "n1"], env=environment)
    assert logs.exit_code == 0 and '"node.started"' in logs.stdout
    assert logs.stderr.index("stdout/stderr of the process") < logs.stderr.index("a traceback, say") \
        < logs.stderr.index("--- node log")
    wrong_count = runner.invoke(run_cluster, ["start", "--nodes", "3"], env=environment)
    assert wrong_count.exit_code == 1 and "has 1 node(s), not 3" in wrong_count.stderr
    unknown = runner.invoke(run_cluster, ["kill", "n9"], env=environment)
    assert unknown.exit_code == 1 and "no node 'n9'" in unknown.stderr
    stopped = runner.invoke(run_cluster, ["stop"], env=environment)
    assert stopped.exit_code == 0 and "stopped n1" in stopped.stdout
    missing = runner.invoke(run_cluster, ["status"], env={"TOKENVAULT_CLUSTER_DIR": str(cluster_directory / "x")})
    assert missing.exit_code == 1 and "no cluster" in missing.stderr


def test_the_hints_of_errors_name_a_cluster_directory_other_than_the_default(
        fake_serve: None, cluster_directory: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The './run_cluster.sh ...' an error says to run left out TOKENVAULT_CLUSTER_DIR: run as said, it
    worked on ./.cluster, another cluster or none (checked on the code before). A directory other than the
    default is named in it now, as start's and restore's 'Try:' line does; the default is not."""
    monkeypatch.chdir(tmp_path)
    prefix = f"TOKENVAULT_CLUSTER_DIR={shlex.quote(str(cluster_directory))} ./run_cluster.sh"
    missing = CliRunner().invoke(run_cluster, ["status"], env={"TOKENVAULT_CLUSTER_DIR": str(cluster_directory)})
    assert missing.exit_code == 1 and f"; run '{prefix} start'" in missing.stderr, missing.stderr
    default = CliRunner().invoke(run_cluster, ["status"], env={"TOKENVAULT_CLUSTER_DIR": None})
    assert default.exit_code == 1 and "; run './run_cluster.sh start'" in default.stderr, default.stderr
    cluster.init_cluster(cluster_directory, 1, ports=free_port_pairs(1))
    stopped = CliRunner().invoke(run_cluster, ["demo"], env={"TOKENVAULT_CLUSTER_DIR": str(cluster_directory)})
    assert f"primary elected: run '{prefix} start' first" in stopped.output, stopped.output
    wrong_count = CliRunner().invoke(run_cluster, ["start", "--nodes", "3"],
                                     env={"TOKENVAULT_CLUSTER_DIR": str(cluster_directory)})
    assert f"run '{prefix} start' without --nodes" in wrong_count.stderr, wrong_count.stderr
    monkeypatch.setenv("FAKE_NODE_EXIT", "1")
    with pytest.raises(ClusterError) as caught:
        cluster.start_cluster(cluster_directory, timeout_seconds=20)
    assert f"'{prefix} status' shows them, '{prefix} stop' stops them" in str(caught.value), str(caught.value)


def test_run_cluster_script_reports_missing_cluster(tmp_path: Path) -> None:
    script = Path(__file__).resolve().parents[2] / "run_cluster.sh"
    result = subprocess.run([str(script), "status"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "TOKENVAULT_CLUSTER_DIR": str(tmp_path / "none")})
    assert result.returncode == 1
    assert "no cluster in" in result.stderr


def luhn_valid(number: str) -> bool:
    digits = [int(character) for character in number.replace(" ", "")][::-1]
    total = sum(digit if position % 2 == 0 else (digit * 2 - 9 if digit * 2 > 9 else digit * 2)
                for position, digit in enumerate(digits))
    return total % 10 == 0


def test_demo_help_says_that_it_destroys_the_epoch_active_when_it_starts() -> None:
    """The demo's lifecycle act destroys the epoch it began in, every token of it (a user's too): its help,
    which named only concurrency, failover, recovery and rotation, says so before anyone runs it."""
    shown = " ".join(CliRunner().invoke(run_cluster, ["demo", "--help"]).output.split())
    assert "Every node must be up" in shown, shown
    assert "migrates the epoch that was active when it started into the new one and destroys it" in shown, shown
    assert "(yours too) detokenizes to null" in shown, shown


def test_demo_card_numbers_are_distinct_luhn_valid_test_numbers() -> None:
    numbers = demo.fake_card_numbers(300, seed=11)
    assert len(set(numbers)) == 300
    assert all(len(number) == 19 and number.startswith("4000 00") and luhn_valid(number) for number in numbers)
    assert demo.fake_card_numbers(5, seed=11) != demo.fake_card_numbers(5, seed=12)


def test_demo_story_reads_only_recent_story_events_and_shows_only_safe_fields(tmp_path: Path) -> None:
    log_file = tmp_path / "node.log"
    lines = [
        {"ts": "2020-01-01T00:00:00Z", "event": "primary.elected", "view": 1},
        {"ts": "2030-01-01T00:00:00Z", "event": "primary.elected", "view": 7, "primary": "n2"},
        {"ts": "2030-01-01T00:00:01Z", "event": "token.issued", "count": 3},
        {"ts": "2030-01-01T00:00:02Z", "event": "peer.down", "peer": "n1", "api_key": "tvk_secret",
         "detail": "has spaces and could be anything"},
    ]
    log_file.write_text("\n".join(json.dumps(line) for line in lines) + "\nnot json\n")
    since = demo.datetime(2025, 1, 1, tzinfo=demo.timezone.utc)
    records = demo.read_log_events(log_file, since)
    assert [record["event"] for record in records] == ["primary.elected", "peer.down"]
    assert demo.describe_fields(records[0]) == "view=7 primary=n2"
    assert demo.describe_fields(records[1]) == "peer=n1"


# ---------------------------------------------------------------- restore with the wrong key; wedged workers


def _backup_under(master_key: MasterKey, directory: Path) -> Path:
    """A backup file of a real store at (41, 3) whose epoch 1 secret is wrapped by ``master_key``."""
    from protocol import Entry, EntryKind
    from tokenvault.core.commands import RotateEpochCommand, encode_command
    from tokenvault.core.snapshots import SnapshotSource, take_checkpoint
    from tokenvault.core.store import VaultStore
    from tokenvault.crypto.keys import new_epoch_secret

    store = VaultStore.open(directory / "source")
    entries = [Entry(index, 3, EntryKind.NOOP, b"") for index in range(1, 41)]
    rotate = RotateEpochCommand(1, master_key.wrap_epoch_secret(1, new_epoch_secret()), 1_000, None, None, None)
    entries.append(Entry(41, 3, EntryKind.COMMAND, encode_command(rotate)))
    store.apply_batch(entries)
    source = SnapshotSource.from_checkpoint(*take_checkpoint(store, directory / "work"), None)
    path = directory / "vault.backup"
    with open(path, "wb") as handle:
        source.write_to(handle)
    source.close()
    store.close()
    return path


def _key_files(directory: Path, **keys: MasterKey) -> dict[str, Path]:
    paths = {}
    for name, key in keys.items():
        paths[name] = directory / f"{name}.key"
        paths[name].write_text(key.to_hex())
        paths[name].chmod(0o600)
    return paths


def test_a_restore_refused_for_the_wrong_master_key_leaves_no_key_behind_and_can_be_retried(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """README: a restore that fails leaves nothing behind; one given the wrong master.key must leave nothing
    that stops the same restore with the right key."""
    monkeypatch.delenv("TOKENVAULT_KEY_DIR", raising=False)
    right, wrong = MasterKey.generate(), MasterKey.generate()
    backup = _backup_under(right, tmp_path)
    keys = _key_files(tmp_path, right=right, wrong=wrong)
    restored = tmp_path / "restored"
    with pytest.raises(ClusterError, match="master key does not open"):
        cluster.restore_cluster(restored, backup, keys["wrong"], 1, ports=free_port_pairs(1),
                                settings=NodeSettings(tls=False))
    assert not restored.exists()
    assert not cluster.key_directory(restored).exists()
    # The same restore with the right key (the nodes are not started here).
    monkeypatch.setattr(cluster, "start_cluster", lambda directory, **options: (cluster.load_cluster(directory), []))
    cluster.restore_cluster(restored, backup, keys["right"], 1, ports=free_port_pairs(1),
                            settings=NodeSettings(tls=False))
    assert (restored / "cluster.json").exists()
    assert MasterKey.from_file(cluster.key_directory(restored) / "master.key").to_hex() == right.to_hex()


def test_a_failed_restore_keeps_a_key_directory_that_was_there_before(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A key directory shared through TOKENVAULT_KEY_DIR: a failed restore removes only what it created."""
    right, wrong = MasterKey.generate(), MasterKey.generate()
    backup = _backup_under(right, tmp_path)
    keys = _key_files(tmp_path, right=right, wrong=wrong)
    shared = tmp_path / "shared-keys"
    shared.mkdir(mode=0o700)
    (shared / "notes.txt").write_text("kept")
    monkeypatch.setenv("TOKENVAULT_KEY_DIR", str(shared))
    with pytest.raises(ClusterError, match="master key does not open"):
        cluster.restore_cluster(tmp_path / "restored", backup, keys["wrong"], 1, ports=free_port_pairs(1),
                                settings=NodeSettings(tls=False))
    assert sorted(entry.name for entry in shared.iterdir()) == ["notes.txt"]
    # A key directory that holds another key refuses the restore before anything is written.
    right.write_file(shared / "master.key")
    with pytest.raises(ClusterError, match="already holds another master key"):
        cluster.restore_cluster(tmp_path / "restored", backup, keys["wrong"], 1, ports=free_port_pairs(1),
                                settings=NodeSettings(tls=False))
    assert not (tmp_path / "restored").exists()
    assert MasterKey.from_file(shared / "master.key").to_hex() == right.to_hex()


STUCK_WORKER = ("import subprocess, sys\n"
                "subprocess.Popen([sys.executable, '-c', 'import signal, time; "
                "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)'])\n")


@pytest.mark.parametrize("command", ["kill", "stop"])
def test_kill_and_stop_sigkill_a_node_process_that_outlives_its_core(
        fake_serve: None, cluster_directory: Path, monkeypatch: pytest.MonkeyPatch, command: str) -> None:
    """A node whose worker does not exit by itself (wedged) after its core is SIGKILLed: `kill` and `stop`
    SIGKILL it with the node's process group, say so, and leave the node's ports free for a restart."""
    monkeypatch.setenv("FAKE_NODE_IGNORE_SIGTERM", "1")
    monkeypatch.setattr(cluster, "_serve_command", lambda node: [
        sys.executable, "-c", STUCK_WORKER + FAKE_NODE_SOURCE, "serve", "--config", str(node.config)])
    monkeypatch.setattr(cluster, "CHILDREN_EXIT_TIMEOUT_SECONDS", 0.5)
    spec, _ = cluster.init_cluster(cluster_directory, 1, ports=free_port_pairs(1), settings=NodeSettings(tls=False))
    cluster.start_cluster(cluster_directory, timeout_seconds=20)
    pid = cluster.running_pid(spec.nodes[0])
    assert pid is not None
    deadline = cluster.time.monotonic() + 10
    while len(cluster._group_members(pid)) < 2 and cluster.time.monotonic() < deadline:
        cluster.time.sleep(0.05)
    messages: list[str] = []
    try:
        if command == "kill":
            cluster.kill_node(cluster_directory, "n1", messages.append)
        else:
            cluster.stop_cluster(cluster_directory, 0.3, messages.append)
        assert cluster._group_members(pid) == []
        assert any("outlived it by 0.5 s: killed them with SIGKILL" in message for message in messages), messages
        cluster._check_ports_free(spec.nodes[0])
    finally:
        for process in cluster._group_members(pid):
            os.kill(process, 9)


def test_a_group_whose_id_is_a_live_process_again_is_not_signalled(monkeypatch: pytest.MonkeyPatch) -> None:
    """The group id is the dead core's pid: when a live process holds that pid (it was reused, which Linux
    does only once the node's group was empty), nothing is signalled."""
    monkeypatch.setattr(cluster, "CHILDREN_EXIT_TIMEOUT_SECONDS", 0.2)
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        messages: list[str] = []
        assert cluster._end_group_of_dead_core("n1", stranger.pid, messages.append) is None
        assert stranger.poll() is None and messages == []
    finally:
        stranger.kill()
        stranger.wait()


@pytest.mark.parametrize("script", ["run_cluster.sh", "run_tests.sh"])
def test_an_interpreter_older_than_3_11_is_refused_before_a_venv_is_made(tmp_path: Path, script: str) -> None:
    """The README's two commands on a machine whose python3 is older than 3.11: they made .venv with it,
    pip then refused the project, and the broken .venv stayed (every later run used it until it was removed
    by hand; checked on the scripts before). They now stop first, saying which Python and how to pick another."""
    repository = Path(__file__).resolve().parents[2]
    for name in (script, "make_venv.sh", "pyproject.toml"):
        shutil.copy(repository / name, tmp_path / name)
    old = tmp_path / "python3.10"
    old.write_text('#!/bin/sh\n[ "$1" = "-V" ] && { echo "Python 3.10.12"; exit 0; }\nexit 1\n')
    old.chmod(0o755)
    command = [str(tmp_path / script), "start"] if script == "run_cluster.sh" else [str(tmp_path / script)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHON": str(old)}, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "needs Python 3.11 or later" in done.stderr and "Python 3.10.12" in done.stderr
    assert "PYTHON=" in done.stderr and not (tmp_path / ".venv").exists()
    # One that is not there is said to be so, in the one line (it was the shell's own error and "missing",
    # over two lines).
    absent = tmp_path / "no-such-python"
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHON": str(absent)},
                          timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr == (f"TokenVault needs Python 3.11 or later; {absent} is not found: set PYTHON to one "
                           f"(PYTHON=python3.11 {tmp_path / script} ...)\n")
    assert not (tmp_path / ".venv").exists()


def test_a_venv_that_fails_halfway_is_removed_saying_what_to_install(tmp_path: Path) -> None:
    """`python3 -m venv` on a Debian machine without python3-venv fails after making .venv/bin/python: the
    half-made .venv was then taken as made, and every later run failed at pip (checked on the script before:
    .venv stayed). It is removed, and the message names the package."""
    repository = Path(__file__).resolve().parents[2]
    for name in ("run_tests.sh", "make_venv.sh", "pyproject.toml"):
        shutil.copy(repository / name, tmp_path / name)
    halfway = tmp_path / "python3.12"
    halfway.write_text('#!/bin/sh\n[ "$1" = "-c" ] && exit 0\n[ "$1" = "-m" ] && { mkdir -p "$3/bin"; '
                       'cp "$0" "$3/bin/python"; echo "ensurepip is not available" >&2; exit 1; }\nexit 1\n')
    halfway.chmod(0o755)
    done = subprocess.run([str(tmp_path / "run_tests.sh")], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": str(halfway)}, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "could not create .venv" in done.stderr and "apt-get install python3-venv" in done.stderr
    assert not (tmp_path / ".venv").exists()
