"""Fixtures shared by the in-process node, service and transport tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from node_support import Cluster, RunningNode, start_cluster


@pytest.fixture(autouse=True)
def _no_master_key_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # The environment variable would override every config's key file.
    monkeypatch.delenv("TOKENVAULT_MASTER_KEY", raising=False)


@pytest.fixture
async def single(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[RunningNode]:
    """A cluster of one, already primary; a test may give it a ShredConfig (indirect parametrization)."""
    cluster = await start_cluster(tmp_path, 1, shred=getattr(request, "param", None))
    try:
        await cluster.wait_for_stable_primary()
        yield cluster.nodes[0]
    finally:
        await cluster.close()


@pytest.fixture
async def trio(tmp_path: Path) -> AsyncIterator[Cluster]:
    """Three nodes with a stable primary."""
    cluster = await start_cluster(tmp_path, 3)
    try:
        await cluster.wait_for_stable_primary()
        yield cluster
    finally:
        await cluster.close()
