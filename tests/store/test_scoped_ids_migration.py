"""Migration 0003 on a database holding data of schema 2: operation and conflict ids become
unique per store (not across stores), and every store's seq stream gets an epoch. Nothing
logged before is lost or changed."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import pytest

from chefia_rt.store import postgres_pool as postgres_module
from chefia_rt.store import sqlite_file as sqlite_module
from chefia_rt.store.base import Store
from chefia_rt.store.postgres import PostgresStore
from chefia_rt.store.rows import migrations
from chefia_rt.store.sqlite import SQLiteStore
from tests.services import drop_pg_schema, new_pg_schema
from tests.store.test_contract import NOW, STAMPS, make_op, sync

OP_ROW = (
    "INSERT INTO sync_operations (id, store_id, seq, entity_type, entity_id, operation, data, "
    "version, deleted, status, conflict_resolved, terminal_id, user_id, priority, timestamp, "
    "server_time) VALUES ({})"
)
CONFLICT_ROW = (
    "INSERT INTO conflicts (id, store_id, operation_id, operation, server_version, server_data, "
    "created_at) VALUES ({})"
)


def old_rows() -> tuple[list[tuple[object, ...]], tuple[object, ...]]:
    """Two applied ops of s1, one pending conflict of s2 (ids unique, as schema 2 forced)."""
    ops = [
        ("pos-1-1", "s1", 1, "tables", "T1", "CREATE", '{"a":1}', 1, False, "applied", False),
        ("pos-1-2", "s1", 2, "tables", "T1", "UPDATE", '{"a":2}', 2, False, "applied", False),
        (
            "pos-1-3",
            "s2",
            None,
            "cashier_operations",
            "C1",
            "UPDATE",
            "{}",
            1,
            False,
            "conflict",
            False,
        ),
    ]
    rows = [(*o, "pos-1", None, "medium", STAMPS[0], NOW) for o in ops]
    op = make_op("pos-1-3", "C1", entity_type="cashier_operations", store_id="s2")
    from dataclasses import asdict

    conflict = ("conflict:pos-1-3", "s2", "pos-1-3", json.dumps(asdict(op)), 1, "{}", NOW)
    return rows, conflict


def only_through(version: int) -> Callable[[str], list[tuple[int, str]]]:
    return lambda prefix: [m for m in migrations(prefix) if m[0] <= version]


@pytest.fixture(params=["sqlite", "postgresql"])
async def migrated(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Store]:
    """A store opened on schema 2 with rows in it, then reopened (migrated to the latest)."""
    rows, conflict = old_rows()
    store: Store
    if request.param == "sqlite":
        path = str(tmp_path / "old.db")
        monkeypatch.setattr(sqlite_module, "migrations", only_through(2))
        old = SQLiteStore(path)
        await old.open()
        await old.close()
        db = sqlite3.connect(path)
        with db:
            db.executemany(OP_ROW.format(", ".join("?" * 16)), rows)
            db.execute(CONFLICT_ROW.format(", ".join("?" * 7)), conflict)
            db.execute("INSERT INTO store_seqs VALUES ('s1', 2)")
        db.close()
        monkeypatch.setattr(sqlite_module, "migrations", migrations)
        store = SQLiteStore(path)
        await store.open()
        try:
            yield store
        finally:
            await store.close()
        return
    dsn = await new_pg_schema()
    try:
        monkeypatch.setattr(postgres_module, "migrations", only_through(2))
        old_pg = PostgresStore(dsn)
        await old_pg.open()
        await old_pg.close()
        conn = await asyncpg.connect(dsn)
        try:
            marks16 = ", ".join(f"${i}" for i in range(1, 17))
            await conn.executemany(
                OP_ROW.format(marks16.replace("$7", "$7::jsonb")),
                rows,
            )
            await conn.execute(
                CONFLICT_ROW.format("$1, $2, $3, $4::jsonb, $5, $6::jsonb, $7"), *conflict
            )
            await conn.execute("INSERT INTO store_seqs VALUES ('s1', 2)")
        finally:
            await conn.close()
        monkeypatch.setattr(postgres_module, "migrations", migrations)
        store = PostgresStore(dsn)
        await store.open()
        try:
            yield store
        finally:
            await store.close()
    finally:
        await drop_pg_schema(dsn)


async def test_migration_keeps_the_log_and_scopes_ids_by_store(migrated: Store) -> None:
    store = migrated
    logged = await store.read_operations("s1", 0, 10)
    assert [(r.id, r.seq, r.data) for r in logged] == [
        ("pos-1-1", 1, {"a": 1}),
        ("pos-1-2", 2, {"a": 2}),
    ]
    pending = await store.get_operation("s2", "pos-1-3")
    assert pending is not None and pending.status == "conflict"
    assert await store.get_operation("s1", "pos-1-3") is None
    bounds = await store.log_bounds("s1")
    assert (bounds.oldest_seq, bounds.last_seq) == (1, 2) and bounds.epoch

    # The retry of a logged op is still a duplicate; another store may now use the same id.
    again, other = await sync(
        store,
        [
            make_op("pos-1-1", "T1", {"a": 1}, operation="CREATE"),
            make_op("pos-1-1", "T1", {"b": 1}, operation="CREATE", store_id="s3"),
        ],
    )
    assert again.status == "duplicate" and again.record == logged[0]
    assert other.status == "applied" and other.record is not None
    assert (other.record.store_id, other.record.seq) == ("s3", 1)
    assert await store.read_operations("s1", 0, 10) == logged
    # The pending conflict of s2 migrated with its new key: a retry repeats it.
    (repeat,) = await sync(
        store, [make_op("pos-1-3", "C1", entity_type="cashier_operations", store_id="s2")]
    )
    assert repeat.status == "conflict" and repeat.conflict is not None
    assert repeat.conflict.id == "conflict:pos-1-3"
