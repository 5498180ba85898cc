"""The audit's huge-body probe against a real `tokenvault serve` process: memory and event loop measured.

One 8 MiB ``{"tokens":[{},{},...]}`` used to be parsed whole before the item
limit was checked: the node's RSS rose from 62 to 300 MB and its event loop
stalled 0.93 s. Now it is refused from a count of its bytes; this measures the
node's peak resident memory (VmHWM in /proc/PID/status) before and after, and
the worst event-loop stall the node itself reports in /metrics
(tokenvault/core/loopwatch.py), in each of its processes: the HTTP worker that
parses the body and the core. The peak is reset before each probe (Linux's
/proc/PID/clear_refs), so each probe is measured on its own. (Before
2026-12-07 only the core was measured, which never sees the body: the probe
could not have failed.)
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from _real_node import RealNode, https_opener, running_real_node

BODY_LIMIT_BYTES = 8 * 1024 * 1024
# The body itself is 8 MiB and the node holds it, its joined copy and one
# copy from the structure bound at once; parsing it whole took 238 MB.
MAX_PEAK_GROWTH_BYTES = 64 * 1024 * 1024
# Well under the default election timeout (1-2 s) and the audit's 0.93 s.
MAX_LOOP_STALL_SECONDS = 0.3
REQUEST_TIMEOUT_SECONDS = 30.0


@pytest.fixture(scope="module")
def real_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealNode]:
    with running_real_node(tmp_path_factory.mktemp("abuse-node")) as node:
        yield node


def reset_peak_memory(pid: int) -> None:
    """Set the process's VmHWM back to its current RSS (Linux: write 5 to /proc/PID/clear_refs)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def memory_kib(pid: int) -> dict[str, int]:
    """VmHWM (peak resident) and VmRSS of a process, in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmHWM", "VmRSS"):
            fields[name] = int(value.split()[0])
    return fields


def post_raw(node: RealNode, path: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(node.base_url + path, data=body, method="POST", headers={
        "Authorization": f"Bearer {node.full_key}", "Content-Type": "application/json"})
    try:
        with https_opener(node.ca_file).open(request, timeout=REQUEST_TIMEOUT_SECONDS) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read())


def loop_stall_max_seconds(node: RealNode) -> dict[str, float]:
    """The worst recent event-loop stall of each process of the node: "" for the core, 'worker="1"' for
    its HTTP worker."""
    text = node.request("GET", "/metrics").body.decode()
    stalls = {labels or "": float(value) for labels, value in re.findall(
        r"^tokenvault_event_loop_stall_max_seconds(?:\{([^}]*)\})? (\S+)$", text, re.MULTILINE)}
    assert set(stalls) == {"", 'worker="1"'}, f"the node's processes export these stall gauges: {stalls}"
    return stalls


def worker_pid(node: RealNode) -> int:
    """The node's one HTTP worker (the last `worker.started` of its log), a child of the node's process."""
    lines = [json.loads(line) for line in node.node.log_file.read_text().splitlines() if line.strip()]
    pid = [line["pid"] for line in lines if line["event"] == "worker.started"][-1]
    parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    assert parent == node.pid, "the logged worker is not the node's child"
    return int(pid)


@pytest.mark.parametrize(("filler", "status"), [(b"{}", 400), (b"[]", 400), (b"0", 413), (b'""', 413)])
def test_eight_mib_of_tiny_values_costs_little_memory_and_no_loop_stall(
    real_node: RealNode, filler: bytes, status: int
) -> None:
    # Warm up the request path, so that what is measured is this one body.
    assert real_node.request("POST", "/v1/detokenize", {"tokens": ["tv1_" + "a" * 32]},
                             key=real_node.full_key).status == 200
    processes = {"core": real_node.pid, "worker": worker_pid(real_node)}
    for pid in processes.values():
        reset_peak_memory(pid)
    before = {name: memory_kib(pid) for name, pid in processes.items()}
    count = (BODY_LIMIT_BYTES - 16) // (len(filler) + 1)
    body = b'{"tokens":[' + b",".join([filler] * count) + b"]}"
    assert len(body) <= BODY_LIMIT_BYTES
    answered, problem = post_raw(real_node, "/v1/detokenize", body)
    assert answered == status and problem["status"] == status
    for name, pid in processes.items():
        growth_bytes = (memory_kib(pid)["VmHWM"] - before[name]["VmHWM"]) * 1024
        assert growth_bytes < MAX_PEAK_GROWTH_BYTES, f"the {name}'s peak RSS grew {growth_bytes / 2**20:.0f} MiB"
    stalls = loop_stall_max_seconds(real_node)
    assert max(stalls.values()) < MAX_LOOP_STALL_SECONDS, stalls
    assert real_node.is_alive()
    assert real_node.request("GET", "/health").status == 200
