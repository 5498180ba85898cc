"""Fixtures for the real-process integration tests.

`make_cluster(nodes=3, proxies=False)` creates and starts a cluster in a fresh
temporary directory; every cluster a test made is stopped afterwards, whatever
happened, and when the test failed the tails of the node logs are printed.

The integration tests are part of the default run: if `tokenvault serve` cannot
start at all, they FAIL (one probe per session finds out, and every test then
fails at once with the probe's reason instead of each waiting for a timeout).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness import ClusterHarness
from tokenvault.devcluster.cluster import NodeSettings


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    # Why: fixtures learn from this whether the test failed, to print the node logs only then.
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture(scope="session")
def serve_probe(tmp_path_factory: pytest.TempPathFactory) -> str | None:
    """Start and stop a one-node cluster once; the failure text, or None when serve works."""
    harness = ClusterHarness(tmp_path_factory.mktemp("probe") / "cluster", node_count=1)
    try:
        harness.create_and_start()
        return None
    except AssertionError as error:
        return str(error)
    finally:
        harness.stop()


@pytest.fixture
def make_cluster(request: pytest.FixtureRequest, tmp_path: Path,
                 serve_probe: str | None) -> Iterator[Callable[..., ClusterHarness]]:
    if serve_probe is not None:
        pytest.fail(f"`tokenvault serve` cannot start a node at all:\n{serve_probe}")
    harnesses: list[ClusterHarness] = []

    def make(nodes: int = 3, proxies: bool = False, start: bool = True,
             settings: NodeSettings | None = None) -> ClusterHarness:
        harness = ClusterHarness(tmp_path / f"cluster{len(harnesses) + 1}", node_count=nodes, with_proxies=proxies,
                                 settings=settings)
        harnesses.append(harness)
        if start:
            harness.create_and_start()
        return harness

    yield make
    failed = any(getattr(getattr(request.node, f"report_{when}", None), "failed", False)
                 for when in ("setup", "call"))
    for harness in harnesses:
        if failed:
            print(f"\n===== node logs of {harness.directory} =====\n{harness.log_tails()}")
        harness.stop()
