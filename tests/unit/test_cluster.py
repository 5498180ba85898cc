"""Tests of tokenvault.cluster: generation of the cluster directory and the process lifecycle.

The lifecycle tests start a stand-in node process (a few lines of stdlib Python
answering /health on the node's HTTP port) in place of `tokenvault serve`, so
they check what the cluster tool does (detached start, pid files, stale pid
detection, SIGTERM then SIGKILL, status) independently of the real node.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from tokenvault import cluster, demo
from tokenvault.auth import hash_api_key
from tokenvault.cluster import ClusterError, NodeSettings
from tokenvault.cluster_cli import run_cluster
from tokenvault.config import SealerConfig, TimingConfig, WalConfig, load_config

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
def cluster_directory(tmp_path: Path) -> Iterator[Path]:
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
    assert set(document) == {"nodes", "api_keys"}
    assert [node["id"] for node in document["nodes"]] == ["n1", "n2", "n3"]
    for number, node in enumerate(document["nodes"], start=1):
        assert set(node) == {"id", "http_url", "peer_addr", "data_dir", "log_file", "pid_file", "config"}
        assert node["http_url"] == f"http://127.0.0.1:{9300 + number}"
        assert node["peer_addr"] == f"127.0.0.1:{9400 + number}"
        for key in ("data_dir", "log_file", "pid_file", "config"):
            assert Path(node[key]).is_absolute()
            assert Path(node[key]).parent.parent == cluster_directory or Path(node[key]).parent == \
                cluster_directory / f"n{number}"
        assert Path(node["data_dir"]).is_dir() and Path(node["config"]).is_file()
    scopes = {name: entry["scopes"] for name, entry in document["api_keys"].items()}
    assert scopes == {"admin": ["admin"], "tokenizer": ["tokenize"], "detokenizer": ["detokenize"],
                      "full": ["admin", "tokenize", "detokenize"]}
    keys = [entry["key"] for entry in document["api_keys"].values()]
    assert len(set(keys)) == 4 and all(key.startswith("tvk_") and len(key) == 47 for key in keys)
    assert spec.to_json() == document


def test_secrets_and_cluster_json_are_private(cluster_directory: Path) -> None:
    cluster.init_cluster(cluster_directory, 1, 9300)
    for name in ("master.key", "cluster.secret", "cluster.json", "n1/node.toml"):
        assert mode_of(cluster_directory / name) == 0o600, name
    for name in ("master.key", "cluster.secret"):
        text = (cluster_directory / name).read_text().strip()
        assert len(text) == 64 and int(text, 16) >= 0
    assert (cluster_directory / "master.key").read_text() != (cluster_directory / "cluster.secret").read_text()
    assert mode_of(cluster_directory / "n1" / "data") == 0o700


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
        assert config.master_key_file == cluster_directory / "master.key"
        assert config.cluster_secret_file == cluster_directory / "cluster.secret"
        assert config.api_key_table().authenticate(spec.key("tokenizer")).scopes == frozenset({"tokenize"})
        assert config.load_cluster_secret() == bytes.fromhex((cluster_directory / "cluster.secret").read_text())
    assert len(set(all_salts)) == len(all_salts) == 3 * len(spec.api_keys)


def test_second_init_keeps_keys_and_refuses_another_node_count(cluster_directory: Path) -> None:
    first, _ = cluster.init_cluster(cluster_directory, 3, 9300)
    master_key = (cluster_directory / "master.key").read_text()
    again, created = cluster.init_cluster(cluster_directory, 3, 9500)
    assert not created
    assert again == first
    assert (cluster_directory / "master.key").read_text() == master_key
    with pytest.raises(ClusterError, match="has 3 node\\(s\\), not 5"):
        cluster.init_cluster(cluster_directory, 5, 9300)


@pytest.mark.parametrize("count", [0, 2, 4, 7])
def test_only_1_3_or_5_nodes(cluster_directory: Path, count: int) -> None:
    with pytest.raises(ClusterError, match="1, 3 or 5"):
        cluster.init_cluster(cluster_directory, count, 9300)


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
                                    SealerConfig(enabled=False))
    spec, _ = cluster.init_cluster(cluster_directory, 1, 9300, settings=settings)
    config = load_config(spec.nodes[0].config)
    assert config.timing == TimingConfig(10, 8, 1, 900)
    assert config.wal.fsync is False and config.log_level == "debug" and config.sealer.enabled is False
    assert cluster.settings_from_environment({}).sealer.enabled is True


@pytest.mark.parametrize("environment", [{"TOKENVAULT_TICK_MS": "fast"}, {"TOKENVAULT_TICK_MS": "0"},
                                         {"TOKENVAULT_WAL_FSYNC": "maybe"}, {"TOKENVAULT_LOG_LEVEL": "loud"},
                                         {"TOKENVAULT_SEALER": "yes"},
                                         {"TOKENVAULT_ELECTION_TIMEOUT_TICKS": "4",
                                          "TOKENVAULT_HEARTBEAT_INTERVAL_TICKS": "9"}])
def test_bad_environment_knobs_are_clear_errors(environment: dict[str, str]) -> None:
    with pytest.raises(ClusterError):
        cluster.settings_from_environment(environment)


def test_directory_and_base_port_defaults() -> None:
    assert cluster.default_cluster_directory({}) == Path.cwd() / ".cluster"
    assert cluster.default_cluster_directory({"TOKENVAULT_CLUSTER_DIR": "rel/dir"}) == Path.cwd() / "rel/dir"
    assert cluster.base_port_from_environment({}) == 8100
    assert cluster.base_port_from_environment({"TOKENVAULT_BASE_PORT": "9000"}) == 9000
    with pytest.raises(ClusterError):
        cluster.base_port_from_environment({"TOKENVAULT_BASE_PORT": "65500"})


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
    wrong_count = runner.invoke(run_cluster, ["start", "--nodes", "3"], env=environment)
    assert wrong_count.exit_code == 1 and "has 1 node(s), not 3" in wrong_count.stderr
    unknown = runner.invoke(run_cluster, ["kill", "n9"], env=environment)
    assert unknown.exit_code == 1 and "no node 'n9'" in unknown.stderr
    stopped = runner.invoke(run_cluster, ["stop"], env=environment)
    assert stopped.exit_code == 0 and "stopped n1" in stopped.stdout
    missing = runner.invoke(run_cluster, ["status"], env={"TOKENVAULT_CLUSTER_DIR": str(cluster_directory / "x")})
    assert missing.exit_code == 1 and "no cluster" in missing.stderr


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
