"""The audit's huge-body probe against a real `tokenvault serve` process: memory and event loop measured.

One 8 MiB ``{"tokens":[{},{},...]}`` used to be parsed whole before the item
limit was checked: the node's RSS rose from 62 to 300 MB and its event loop
stalled 0.93 s. Now it is refused from a count of its bytes; this measures the
node's peak resident memory (VmHWM in /proc/PID/status) before and after, and
the worst event-loop stall the node itself reports in /metrics
(tokenvault/core/loopwatch.py). The peak is reset before each probe (Linux's
/proc/PID/clear_refs), so each probe is measured on its own.
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


def loop_stall_max_seconds(node: RealNode) -> float:
    text = node.request("GET", "/metrics").body.decode()
    match = re.search(r"^tokenvault_event_loop_stall_max_seconds (\S+)$", text, re.MULTILINE)
    assert match is not None, "the node exports no event-loop stall gauge"
    return float(match.group(1))


@pytest.mark.parametrize(("filler", "status"), [(b"{}", 400), (b"[]", 400), (b"0", 413), (b'""', 413)])
def test_eight_mib_of_tiny_values_costs_little_memory_and_no_loop_stall(
    real_node: RealNode, filler: bytes, status: int
) -> None:
    # Warm up the request path, so that what is measured is this one body.
    assert real_node.request("POST", "/v1/detokenize", {"tokens": ["tv1_" + "a" * 32]},
                             key=real_node.full_key).status == 200
    reset_peak_memory(real_node.pid)
    before = memory_kib(real_node.pid)
    count = (BODY_LIMIT_BYTES - 16) // (len(filler) + 1)
    body = b'{"tokens":[' + b",".join([filler] * count) + b"]}"
    assert len(body) <= BODY_LIMIT_BYTES
    answered, problem = post_raw(real_node, "/v1/detokenize", body)
    assert answered == status and problem["status"] == status
    after = memory_kib(real_node.pid)
    growth_bytes = (after["VmHWM"] - before["VmHWM"]) * 1024
    assert growth_bytes < MAX_PEAK_GROWTH_BYTES, f"peak RSS grew {growth_bytes / 2**20:.0f} MiB"
    assert loop_stall_max_seconds(real_node) < MAX_LOOP_STALL_SECONDS
    assert real_node.is_alive()
    assert real_node.request("GET", "/health").status == 200
