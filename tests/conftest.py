"""Shared fixtures. Services: tests that need PostgreSQL or Redis skip with a reason on a machine
without them, and fail instead when CHEFIA_REQUIRE_SERVICES=1 (as in CI)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.helpers import RunningServer, running_server

REQUIRE_SERVICES = os.environ.get("CHEFIA_REQUIRE_SERVICES") == "1"


def service_missing(name: str, reason: str) -> None:
    """Skip (or fail in CI) a test whose service is not reachable."""
    message = f"{name} not reachable: {reason}"
    if REQUIRE_SERVICES:
        pytest.fail(message + " (CHEFIA_REQUIRE_SERVICES=1)")
    pytest.skip(message)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RunningServer]:
    """A running server on the embedded default (SQLite file, in-process bus)."""
    async with running_server(tmp_path) as running:
        yield running
