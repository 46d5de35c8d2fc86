"""Fixtures of the store contract suite: every storage backend passes tests/store/test_contract.py
unchanged.

`store` is an open, empty Store of each backend in BACKENDS. Tests speak to it through the Store
protocol only; what the protocol cannot read back (audit rows, session rows, pending conflicts,
log rows without a seq) they read through `peek`, a small read-only window on the backend's
tables that returns plain Python values, so the assertions stay backend-neutral.

Adding PostgreSQL: append "postgresql" to BACKENDS and give it a branch in `open_store` (a fresh,
empty database or schema per test; unreachable server → `tests.services.service_missing`), in
`reopen_store` and in `peek_for` (asyncpg queries, timestamps
back to the ISO strings the records carry). Nothing else changes.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import asyncpg
import pytest

from chefia_rt.protocol.messages import format_timestamp
from chefia_rt.store.base import Store
from chefia_rt.store.postgres import PostgresStore
from chefia_rt.store.sqlite import SQLiteStore
from tests.services import drop_pg_schema, new_pg_schema

BACKENDS = ["sqlite", "postgresql"]

# Columns holding JSON, per logical table; `peek` hands them back decoded.
JSON_COLUMNS = {
    "entities": {"data", "field_versions"},
    "sync_operations": {"data"},
    "audit_logs_master": {"changes"},
    "conflicts": {"operation", "server_data"},
    "websocket_connections": set(),
}
BOOL_COLUMNS = {"deleted", "conflict_resolved"}


class Peek(Protocol):
    """Read-only access to a backend's tables, for what the Store protocol cannot read back."""

    async def rows(self, table: str, **where: Any) -> list[dict[str, Any]]:
        """Rows of a logical table (a key of JSON_COLUMNS) whose columns equal `where`, as dicts:
        JSON columns decoded, flags as bool, timestamps as the strings the records carry."""
        ...


class SQLitePeek:
    """Peek through a separate connection: it sees only what was committed."""

    def __init__(self, path: str) -> None:
        self.path = path

    async def rows(self, table: str, **where: Any) -> list[dict[str, Any]]:
        json_columns = JSON_COLUMNS[table]  # KeyError: not a table of the contract

        def read() -> list[dict[str, Any]]:
            db = sqlite3.connect(self.path)
            try:
                db.row_factory = sqlite3.Row
                sql = f"SELECT * FROM {table}"
                if where:
                    sql += " WHERE " + " AND ".join(f"{column} = ?" for column in where)
                return [dict(row) for row in db.execute(sql, list(where.values()))]
            finally:
                db.close()

        found = await asyncio.to_thread(read)
        for row in found:
            for column in json_columns:
                row[column] = json.loads(row[column])
            for column in BOOL_COLUMNS & row.keys():
                row[column] = bool(row[column])
        return found


class PostgresPeek:
    """Peek through a separate connection: it sees only what was committed."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    async def rows(self, table: str, **where: Any) -> list[dict[str, Any]]:
        json_columns = JSON_COLUMNS[table]  # KeyError: not a table of the contract
        conn = await asyncpg.connect(self.dsn)
        try:
            sql = f"SELECT * FROM {table}"
            if where:
                sql += " WHERE " + " AND ".join(
                    f"{column} = ${i}" for i, column in enumerate(where, 1)
                )
            found = [dict(r) for r in await conn.fetch(sql, *where.values())]
        finally:
            await conn.close()
        for row in found:
            row.pop("id", None) if table == "audit_logs_master" else None
            for column in json_columns:
                row[column] = json.loads(row[column])
            for column, value in row.items():
                if isinstance(value, datetime):
                    row[column] = format_timestamp(value)
        return found


async def open_store(backend: str, tmp_path: Path) -> Store:
    """A new, open, empty store of `backend`."""
    store: Store
    if backend == "sqlite":
        store = SQLiteStore(str(tmp_path / "contract.db"))
    elif backend == "postgresql":
        store = PostgresStore(await new_pg_schema())
    else:
        raise AssertionError(f"no such backend {backend!r}")
    await store.open()
    return store


async def reopen_store(store: Store) -> Store:
    """Another open Store on the same storage as `store` (a restart of the server)."""
    if isinstance(store, SQLiteStore):
        again = SQLiteStore(store.path)
        await again.open()
        return again
    if isinstance(store, PostgresStore):
        other = PostgresStore(store.dsn)
        await other.open()
        return other
    raise AssertionError(f"no reopen for {store.kind!r}")


def peek_for(store: Store) -> Peek:
    if isinstance(store, SQLiteStore):
        return SQLitePeek(store.path)
    if isinstance(store, PostgresStore):
        return PostgresPeek(store.dsn)
    raise AssertionError(f"no peek for {store.kind!r}")


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """An open, empty store of each backend; closed after the test (closing twice is fine)."""
    opened = await open_store(request.param, tmp_path)
    try:
        yield opened
    finally:
        await opened.close()
        if isinstance(opened, PostgresStore):
            await drop_pg_schema(opened.dsn)


@pytest.fixture
def peek(store: Store) -> Peek:
    return peek_for(store)
