"""Shared fixtures. Services: tests that need PostgreSQL or Redis skip with a reason on a machine
without them, and fail instead when CHEFIA_REQUIRE_SERVICES=1 (as in CI)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.helpers import RunningServer, running_server
from tests.services import drop_pg_schema, new_pg_schema


@pytest.fixture(params=["sqlite", "postgresql"])
async def server(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[RunningServer]:
    """A running server on each storage backend: the embedded default (SQLite file) and
    PostgreSQL (a fresh schema), both with the in-process bus."""
    if request.param == "sqlite":
        async with running_server(tmp_path) as running:
            yield running
        return
    dsn = await new_pg_schema()
    try:
        async with running_server(tmp_path, database_url=dsn) as running:
            yield running
    finally:
        await drop_pg_schema(dsn)
