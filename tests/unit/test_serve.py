"""tokenvault.serve: the limit on open files a node process raises before it serves, and the warning
when even the hard limit is too low for the node's configuration."""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import selectors
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from node_support import make_configs
from tokenvault import serve
from tokenvault.api.http import OPEN_FILES_HEADROOM
from tokenvault.config import write_node_config

REPOSITORY = Path(__file__).resolve().parents[2]
TOKENVAULT = str(Path(sys.executable).parent / "tokenvault")
START_SECONDS = 30.0
LOW_HARD_LIMIT = 600
# Connections opened beyond the ones the node takes under that limit.
EXTRA_CONNECTIONS = 12
# How long without a new refusal before the refusals are taken to be all in.
REFUSALS_SETTLE_SECONDS = 0.5


def test_the_soft_limit_on_open_files_is_raised_to_the_hard_one() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    script = ("import resource\n"
              "from tokenvault.serve import raise_open_files_limit\n"
              "resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))\n"
              "print(raise_open_files_limit(), *resource.getrlimit(resource.RLIMIT_NOFILE))\n")
    answer = subprocess.run([sys.executable, "-c", script], cwd=REPOSITORY, capture_output=True, text=True,
                            timeout=30, check=True)
    limit, soft, hard_after = (int(field) for field in answer.stdout.split())
    expected = serve.OPEN_FILES_WHEN_UNLIMITED if hard == resource.RLIM_INFINITY else hard
    assert limit == soft == expected and hard_after == hard


def test_the_connections_a_process_takes_follow_the_limit_in_force_not_the_hard_one() -> None:
    """Where the soft limit could not be raised (a system that refuses it), the cap follows the soft
    limit: counting on the hard one would let connections take the descriptors the store needs."""
    script = ("import resource\n"
              "from tokenvault.api.http import connections_allowed\n"
              "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n"
              "resource.setrlimit(resource.RLIMIT_NOFILE, (700, hard))\n"
              "print(connections_allowed())\n")
    answer = subprocess.run([sys.executable, "-c", script], cwd=REPOSITORY, capture_output=True, text=True,
                            timeout=30, check=True)
    assert int(answer.stdout) == 700 - OPEN_FILES_HEADROOM


def _statuses_of_many_connections(port: int, count: int) -> list[int]:
    """Open ``count`` connections at once; read the 503 of each one the node refused as it accepted it
    (written unasked), then send /health on each of the others and read its status. Nothing is sent on a
    refused connection: the node has closed it, and bytes sent there would reset it before its 503 is read."""
    connections = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(count)]
    try:
        statuses = {}
        with selectors.DefaultSelector() as selector:
            for connection in connections:
                selector.register(connection, selectors.EVENT_READ)
            while ready := selector.select(timeout=REFUSALS_SETTLE_SECONDS):  # until a wait brings none
                for key, _ in ready:
                    selector.unregister(key.fileobj)
                    statuses[key.fileobj] = _status(key.fileobj)
        for connection in connections:
            if connection not in statuses:
                connection.sendall(b"GET /health HTTP/1.1\r\nHost: node\r\n\r\n")
                statuses[connection] = _status(connection)
        return [statuses[connection] for connection in connections]
    finally:
        for connection in connections:
            connection.close()


def _status(connection: socket.socket) -> int:
    line = connection.makefile("rb").readline()
    return int(line.split()[1]) if line.startswith(b"HTTP/1.1 ") else 0


def _events(log_file: Path) -> list[dict[str, object]]:
    """The node's log events so far; a line still being written is left for the next read."""
    events = []
    for line in log_file.read_text().splitlines() if log_file.exists() else []:
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events


def test_a_node_whose_hard_limit_is_too_low_says_so_and_serves(tmp_path: Path) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < LOW_HARD_LIMIT:
        pytest.skip(f"this machine's hard limit on open files ({hard}) is below the test's")
    log_file = tmp_path / "node.log"
    (config,) = make_configs(tmp_path, 1, log_file=log_file)
    config = dataclasses.replace(config, http=dataclasses.replace(config.http, workers=0))  # one process
    path = tmp_path / "node.toml"
    write_node_config(path, config)
    environment = {name: value for name, value in os.environ.items() if not name.startswith("TOKENVAULT_")}

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (LOW_HARD_LIMIT, LOW_HARD_LIMIT))

    process = subprocess.Popen([TOKENVAULT, "serve", "--config", str(path)], cwd=REPOSITORY, env=environment,
                               preexec_fn=low_limit, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + START_SECONDS
        events = _events(log_file)
        while not any(event.get("event") == "node.started" for event in events):
            assert process.poll() is None, "the node exited"
            assert time.monotonic() < deadline, "the node did not start"
            time.sleep(0.05)
            events = _events(log_file)
        low = [event for event in events if event.get("event") == "node.open_files_limit_low"]
        assert len(low) == 1
        assert low[0]["limit"] == LOW_HARD_LIMIT
        assert low[0]["needed"] == config.http.max_connections + OPEN_FILES_HEADROOM
        allowed = LOW_HARD_LIMIT - OPEN_FILES_HEADROOM
        assert low[0]["connections_per_process"] == allowed
        url = f"http://127.0.0.1:{config.http.port}/health"
        while True:  # and it serves
            try:
                with urllib.request.urlopen(url, timeout=2) as answer:
                    assert answer.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline, "the node never answered /health"
                time.sleep(0.05)
        # It takes that many connections and answers the ones past them 503, closing them at once.
        statuses = _statuses_of_many_connections(config.http.port, allowed + EXTRA_CONNECTIONS)
        assert statuses.count(503) >= EXTRA_CONNECTIONS and 0 < statuses.count(200) <= allowed, statuses
        with urllib.request.urlopen(url, timeout=2) as answer:  # and serves on once they are gone
            assert answer.status == 200
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def _nested_peer_record(data_dir: Path) -> str:
    data_dir.mkdir(parents=True)
    (data_dir / "peer-incarnations.json").write_bytes(b"[" * 100_000)  # deeper than json's parser goes
    return f"{data_dir / 'peer-incarnations.json'} is not a record this node wrote"


def _incarnation_directory(data_dir: Path) -> str:
    (data_dir / "incarnation").mkdir(parents=True)
    return f"{data_dir / 'incarnation'} cannot be read (Is a directory)"


def _nested_rocksdict_config(data_dir: Path) -> str:
    from tokenvault.core.store import VaultStore

    data_dir.mkdir(parents=True)
    VaultStore.open(data_dir / "store").close()
    config = data_dir / "store" / "gen-000001" / "rocksdict-config.json"
    config.write_bytes(b"[" * 4000)
    return f"{config} is not JSON"


def _data_directory_a_file(data_dir: Path) -> str:
    data_dir.parent.mkdir(parents=True)
    data_dir.write_bytes(b"not a directory")
    return f"FileExistsError: File exists ({data_dir})"


UNREADABLE_DATA = {"peer record nested": _nested_peer_record, "incarnation a directory": _incarnation_directory,
                   "rocksdict config nested": _nested_rocksdict_config, "data directory a file": _data_directory_a_file}


@pytest.mark.parametrize("case", sorted(UNREADABLE_DATA))
def test_a_node_whose_data_directory_cannot_be_read_refuses_to_start_saying_why(tmp_path: Path, case: str) -> None:
    """A file of the data directory nested deeper than json's parser goes (RecursionError), a directory in a
    file's place, a data directory that is a file: `tokenvault serve` logs node.refused_to_start naming the
    file and exits 3, never a traceback (docs/logs.md)."""
    log_file = tmp_path / "node.log"
    (config,) = make_configs(tmp_path, 1, log_file=log_file)
    config = dataclasses.replace(config, http=dataclasses.replace(config.http, workers=0))
    expected = UNREADABLE_DATA[case](Path(config.data_dir))
    path = tmp_path / "node.toml"
    write_node_config(path, config)
    environment = {name: value for name, value in os.environ.items() if not name.startswith("TOKENVAULT_")}
    result = subprocess.run([TOKENVAULT, "serve", "--config", str(path)], cwd=REPOSITORY, env=environment,
                            capture_output=True, text=True, timeout=60)
    refused = [event for event in _events(log_file) if event.get("event") == "node.refused_to_start"]
    assert result.returncode == 3, result.stderr[-2000:]
    assert len(refused) == 1 and str(refused[0]["reason"]).startswith(expected), refused
    assert "Traceback" not in result.stdout + result.stderr
    assert not any(event.get("event") == "node.started" for event in _events(log_file))
