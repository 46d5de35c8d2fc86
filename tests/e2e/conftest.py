"""Every end-to-end test runs on each WebSocket front end (WS_TRANSPORT), with two exceptions
that keep the suite's time in bounds: PostgreSQL storage (the `server` fixture's `postgresql`)
is exercised on the default front end only, the storage being the same code whatever speaks the
protocol; and the multi-node files (ONE_TRANSPORT), each test of which starts a cluster of
supervised nodes, run on the default only too."""

from __future__ import annotations

from pathlib import Path

import pytest

from chefia_rt.config import TRANSPORTS
from tests.helpers import TEST_TRANSPORT_ENV

DEFAULT = TRANSPORTS[0]
ONE_TRANSPORT = frozenset({"test_cluster.py", "test_cache_cluster.py"})
HERE = Path(__file__).parent


@pytest.fixture(autouse=True, params=TRANSPORTS)
def transport(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The front end of the servers this test starts (tests/helpers.server_transport)."""
    name: str = request.param
    monkeypatch.setenv(TEST_TRANSPORT_ENV, name)
    return name


def _runs(item: pytest.Item) -> bool:
    callspec = getattr(item, "callspec", None)
    params = callspec.params if callspec is not None else {}
    if params.get("transport", DEFAULT) == DEFAULT:
        return True
    if params.get("server") == "postgresql":
        return False
    return item.path.name not in ONE_TRANSPORT


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    dropped = [item for item in items if item.path.parent == HERE and not _runs(item)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        ids = {id(item) for item in dropped}
        items[:] = [item for item in items if id(item) not in ids]
