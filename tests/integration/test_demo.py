"""``./run_cluster.sh demo`` (CONTRACT.md section 1, README "Run the cluster"): the narrated, self-checking demo
runs against a cluster made by ``./run_cluster.sh start`` and exits 0 only when every one of its checks passed,
and the epoch it destroys takes no value with it: a card token made before it, as README's tour makes one, has
its value re-issued in the new epoch. Real processes, the commands a newcomer types; about 15 s."""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

import pytest

from harness import ELECTION_TIMEOUT_TICKS, HEARTBEAT_INTERVAL_TICKS, REQUEST_TIMEOUT_MS, TICK_MS, free_base_port
from tokenvault.client.vault import Client

pytestmark = pytest.mark.integration

REPOSITORY = Path(__file__).resolve().parents[2]
COMMAND_TIMEOUT_SECONDS = 120.0
TOUR_CARD = "4111 1111 1111 1111"


def run_cluster(environment: dict[str, str], *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(REPOSITORY / "run_cluster.sh"), *arguments], capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT_SECONDS, env={**os.environ, **environment}, cwd=REPOSITORY)


def test_the_demo_runs_every_check_on_a_started_cluster_and_exits_0(tmp_path: Path) -> None:
    environment = {"TOKENVAULT_CLUSTER_DIR": str(tmp_path / "cluster"), "TOKENVAULT_KEY_DIR": str(tmp_path / "keys"),
                   "TOKENVAULT_BASE_PORT": str(free_base_port(3, random.Random())),
                   "TOKENVAULT_TICK_MS": str(TICK_MS),
                   "TOKENVAULT_ELECTION_TIMEOUT_TICKS": str(ELECTION_TIMEOUT_TICKS),
                   "TOKENVAULT_HEARTBEAT_INTERVAL_TICKS": str(HEARTBEAT_INTERVAL_TICKS),
                   "TOKENVAULT_REQUEST_TIMEOUT_MS": str(REQUEST_TIMEOUT_MS)}
    started = run_cluster(environment, "start")
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        # A card token of the README's tour, made before the demo: the epoch it lives in is the one the demo
        # migrates and destroys, so the value must have a card token in the new epoch afterwards.
        document = json.loads((tmp_path / "cluster" / "cluster.json").read_text())
        urls = [node["http_url"] for node in document["nodes"]]
        with Client(urls, document["api_keys"]["full"]["key"], ca_file=document["ca_file"]) as vault:
            card_epoch = vault.tokenize([TOUR_CARD], token_format="card").epoch
        demo = run_cluster(environment, "demo")
        output = demo.stdout + demo.stderr
        assert demo.returncode == 0, output
        assert "Demo finished: all checks passed." in output, output
        assert "FAIL" not in output, output
        # The killed primary's restart is narrated from its own log: how far it replayed and caught up.
        assert "node.recovered" in output and "caught_up_index=" in output, output
        with Client(urls, document["api_keys"]["full"]["key"], ca_file=document["ca_file"]) as vault:
            assert [entry.state for entry in vault.list_epochs().epochs if entry.epoch == card_epoch] == \
                ["destroyed"]
            active = vault.list_epochs().active_epoch
            digit_tokens = [token for token in vault.epoch_tokens(active, None, 1000).tokens if token.isdigit()]
            values = vault.detokenize(digit_tokens, epoch=active)
        assert "".join(TOUR_CARD.split()) in values, "the demo destroyed a card token's epoch without migrating it"
    finally:
        stopped = run_cluster(environment, "stop")
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
