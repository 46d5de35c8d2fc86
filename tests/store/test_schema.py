"""The schema description (chefia_rt/store/schema.py) against what the migrations build.

Each store opens a fresh database (a throwaway SQLite file, a new PostgreSQL schema), which
applies every migration the way a server does; the live tables, their columns in order, types,
NOT NULL and primary keys must be what the description says. The record tuples of rows.py must
put each record field at its described column.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import asyncpg

from chefia_rt.domain import AuditRecord, Conflict, Entity, EntityKey, Operation, OpRecord
from chefia_rt.store import schema
from chefia_rt.store.base import SessionRecord
from chefia_rt.store.postgres import PostgresStore
from chefia_rt.store.rows import (
    AUDIT_COLUMNS,
    CONFLICT_COLUMNS,
    ENTITY_COLUMNS,
    OP_COLUMNS,
    audit_values,
    conflict_values,
    entity_values,
    op_values,
)
from chefia_rt.store.sqlite import SQLiteStore
from tests.services import drop_pg_schema, new_pg_schema

# (column, type, nullable) in table order, and the primary key, per table.
Shape = tuple[list[tuple[str, str, bool]], tuple[str, ...]]

# Where the migrations keep their own bookkeeping, outside the described schema.
BOOKKEEPING = "schema_migrations"
# PostgreSQL cannot give the partitioned audit log a primary key without its partition column.
NO_PG_KEY = {"audit_logs_master"}
# How PostgreSQL's catalog spells the types the description names as casts spell them.
PG_TYPE_NAMES = {"timestamptz": "timestamp with time zone"}


def described(database: str) -> dict[str, Shape]:
    shapes: dict[str, Shape] = {}
    for table in schema.TABLES:
        if database not in table.stores:
            continue
        columns = []
        for c in table.columns:
            kind = c.kind.sqlite if database == "sqlite" else c.kind.postgres
            columns.append((c.name, PG_TYPE_NAMES.get(kind, kind), c.nullable))
        key = () if database == "postgresql" and table.name in NO_PG_KEY else table.key
        shapes[table.name] = (columns, key)
    return shapes


def sqlite_shapes(path: Path) -> dict[str, Shape]:
    db = sqlite3.connect(path)
    try:
        tables = [
            name
            for (name,) in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' "
                "AND name NOT LIKE 'sqlite_%' ORDER BY name"
            )
        ]
        shapes: dict[str, Shape] = {}
        for table in tables:
            info = db.execute(f"PRAGMA table_info({table})").fetchall()
            # A primary key column is never NULL in what the stores write, whatever SQLite
            # allows in a non-INTEGER key.
            columns = [(name, kind, not (notnull or pk)) for _, name, kind, notnull, _, pk in info]
            key = tuple(name for *_, name, _, _, _, pk in sorted(info, key=lambda r: r[5]) if pk)
            shapes[table] = (columns, key)
        return shapes
    finally:
        db.close()


async def postgres_shapes(dsn: str) -> dict[str, Shape]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT c.relname AS table, a.attname AS name, "
            "format_type(a.atttypid, NULL) AS type, NOT a.attnotnull AS nullable "
            "FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid "
            "WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind IN ('r', 'p') "
            "AND NOT c.relispartition AND a.attnum > 0 AND NOT a.attisdropped "
            "ORDER BY c.relname, a.attnum"
        )
        keys = await conn.fetch(
            "SELECT c.relname AS table, array_agg(a.attname ORDER BY k.ord) AS key "
            "FROM pg_constraint p JOIN pg_class c ON c.oid = p.conrelid "
            "CROSS JOIN unnest(p.conkey) WITH ORDINALITY AS k(attnum, ord) "
            "JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum "
            "WHERE p.contype = 'p' AND c.relnamespace = current_schema()::regnamespace "
            "GROUP BY c.relname"
        )
    finally:
        await conn.close()
    shapes: dict[str, Shape] = {}
    for r in rows:
        shapes.setdefault(r["table"], ([], ()))[0].append((r["name"], r["type"], r["nullable"]))
    for k in keys:
        shapes[k["table"]] = (shapes[k["table"]][0], tuple(k["key"]))
    return shapes


async def test_the_sqlite_migrations_build_the_described_schema(tmp_path: Path) -> None:
    path = tmp_path / "schema.db"
    store = SQLiteStore(str(path))
    await store.open()
    await store.close()
    live = sqlite_shapes(path)
    assert BOOKKEEPING in live
    del live[BOOKKEEPING]
    assert live == described("sqlite")


async def test_the_postgres_migrations_build_the_described_schema() -> None:
    dsn = await new_pg_schema()
    try:
        store = PostgresStore(dsn)
        await store.open()
        await store.close()
        live = await postgres_shapes(dsn)
    finally:
        await drop_pg_schema(dsn)
    assert BOOKKEEPING in live
    del live[BOOKKEEPING]
    assert live == described("postgresql")


def test_a_changed_table_is_told_apart(tmp_path: Path) -> None:
    """The comparison sees a column moved, retyped, made nullable or missing."""
    path = tmp_path / "changed.db"
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE conflicts (store_id TEXT NOT NULL, id TEXT NOT NULL, "
        "operation_id TEXT NOT NULL, operation TEXT NOT NULL, server_version TEXT NOT NULL, "
        "server_data TEXT, PRIMARY KEY (store_id, id))"
    )
    db.close()
    live = sqlite_shapes(path)["conflicts"]
    expected = described("sqlite")["conflicts"]
    assert live[1] == expected[1]
    assert live[0] != expected[0]
    assert [c[0] for c in live[0]] != [c[0] for c in expected[0]]


def distinct(record_type: type[Any], **given: Any) -> Any:
    """A record whose every field holds a value no other field holds."""
    values = {f.name: f"{f.name}-value" for f in fields(record_type) if f.name not in given}
    return record_type(**values, **given)


def positions(columns: str, values: tuple[Any, ...]) -> dict[str, Any]:
    return dict(zip(columns.split(", "), values, strict=True))


def same(value: Any, *more: Any) -> Any:
    return value


def tagged(tag: str) -> Callable[..., tuple[str, Any]]:
    """An encoder that marks what it was given, to see where it lands."""
    return lambda value, *_: (tag, value)


def test_op_values_follow_the_description() -> None:
    record: OpRecord = distinct(OpRecord)
    row = positions(OP_COLUMNS, op_values(record, same))
    assert row == {c: getattr(record, c) for c in schema.SYNC_OPERATIONS.record}


def test_audit_values_follow_the_description() -> None:
    audit: AuditRecord = distinct(AuditRecord, before=None, after=None, claimed_user_id=None)
    row = positions(AUDIT_COLUMNS, audit_values(audit, lambda text: ("changes", text), same))
    assert row.pop("changes") == ("changes", '{"before":null,"after":null}')
    assert row == {c: getattr(audit, c) for c in schema.AUDIT_LOGS.record if c != "changes"}


def test_entity_values_follow_the_description() -> None:
    key = EntityKey("store_id-value", "entity_type-value", "entity_id-value")
    entity: Entity = distinct(Entity, key=key)
    row = positions(
        ENTITY_COLUMNS,
        entity_values(entity, tagged("data"), tagged("versions"), tagged("time")),
    )
    assert row == {
        "store_id": key.store_id,
        "entity_type": key.entity_type,
        "entity_id": key.entity_id,
        "version": entity.version,
        "data": ("data", entity.data),
        "deleted": entity.deleted,
        "timestamp": entity.timestamp,
        "updated_by": entity.updated_by,
        "field_versions": ("versions", entity.field_versions),
        "updated_at": ("time", entity.updated_at),
    }
    assert list(row) == list(schema.ENTITIES.record)


def test_conflict_values_follow_the_description() -> None:
    operation: Operation = distinct(Operation)
    conflict = Conflict("c-1", operation, 7, {"a": 1}, "created-value")
    row = positions(
        CONFLICT_COLUMNS,
        conflict_values(conflict, lambda op: ("op", op.id), lambda data: ("data", data)),
    )
    assert row == {
        "id": "c-1",
        "store_id": operation.store_id,
        "operation_id": operation.id,
        "operation": ("op", operation.id),
        "server_version": 7,
        "server_data": ("data", {"a": 1}),
        "created_at": "created-value",
    }


def test_session_records_are_the_session_log_columns() -> None:
    assert [f.name for f in fields(SessionRecord)] == list(schema.WEBSOCKET_CONNECTIONS.record)
    assert schema.WEBSOCKET_CONNECTIONS.record == schema.WEBSOCKET_CONNECTIONS.names
